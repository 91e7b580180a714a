-- Orthanc: forward every stable study to the spine-triage node (C-STORE), except the
-- results spine-triage itself wrote into the study (its SR series), so a result is never
-- echoed back. Also forwards ROI reports (SR) that a viewer stored in Orthanc.
--
-- Needs, in the Orthanc configuration: the node as a DICOM modality named "spine-triage",
--   "DicomModalities": { "spine-triage": [ "SPINE_TRIAGE", "<node host>", 11112 ] }
-- and "StableAge" (seconds without a new instance before a study counts as stable).

TRIAGE_MODALITY = 'spine-triage'
TRIAGE_MANUFACTURER = 'spine-triage project'

function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local forward = {}
  for _, item in ipairs(series) do
    local main = item['MainDicomTags'] or {}
    if main['Manufacturer'] ~= TRIAGE_MANUFACTURER then
      table.insert(forward, item['ID'])
    end
  end
  if #forward > 0 then
    RestApiPost('/modalities/' .. TRIAGE_MODALITY .. '/store',
                DumpJson({ Resources = forward, Asynchronous = true }, true))
  end
end
