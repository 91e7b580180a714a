// Drives the OHIF viewer in headless Chromium (playwright-core) for tests/viewer/ (pytest).
//
// Usage: node ohif_driver.mjs '<JSON request>'; prints one line of JSON (the result) last.
// Request: base (Orthanc's URL), username, password (HTTP basic auth of Orthanc), chromium,
// playwright (path of playwright-core's index.mjs), study (Study Instance UID), action:
//   "sr":   double-click the thumbnail of series number `srSeries`, wait for the SR's regions
//           to be drawn (cornerstone's DICOMSRDisplay annotations), return them: label, graphic
//           type, points in patient coordinates (world), and where they are on the page.
//   "draw": double-click the thumbnail of series number `imageSeries`, show the instance
//           `sop`, draw with OHIF's `tool` by mouse along `path` (image coordinates
//           [column, row], SCOORD convention): RectangleROI drags from one corner to the other
//           (`path` holds the two), PlanarFreehandROI traces the closed polygon `path` (it
//           is drawn, but OHIF 3.13 did not offer it for tracking here, so "Create SR" found
//           nothing to save: the tests use RectangleROI); track the measurement, save it
//           with "Create SR" as `reportName` (OHIF stores it by STOW-RS); return OHIF's
//           measurement (points in patient coordinates) and the STOW-RS answer's status.
// `screenshot`: a PNG written at the end (also on a failure). Steps wait on conditions; two
// short pauses let the viewport and its SVG layer redraw.

const request = JSON.parse(process.argv[2]);
const { chromium } = await import(request.playwright);

const log = [];
const browser = await chromium.launch({
  executablePath: request.chromium,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic'],
});
const result = { action: request.action };
let page = null;
try {
  const context = await browser.newContext({
    viewport: { width: request.width ?? 1400, height: request.height ?? 900 },
    httpCredentials: { username: request.username, password: request.password },
  });
  page = await context.newPage();
  page.on('console', (message) => {
    const text = message.text();
    if (message.type() === 'error' || message.type() === 'warning' || /rehydratable|GraphicType/.test(text)) {
      log.push(`${message.type()}: ${text.slice(0, 300)}`);
    }
  });
  page.on('pageerror', (error) => log.push(`pageerror: ${error.message}`));
  page.on('response', (response) => {
    if (response.status() >= 400) log.push(`http ${response.status()} ${response.url()}`);
  });
  const started = Date.now();
  await page.goto(`${request.base}/ohif/viewer?StudyInstanceUIDs=${request.study}`);
  // The onboarding tour comes up on a first visit; its "Skip all" ends it.
  await page.getByText('Skip all', { exact: true }).click({ timeout: 60000 });
  result.viewerReadyMs = Date.now() - started;

  if (request.action === 'sr') {
    await page.locator(`[data-series="${request.srSeries}"]`).first().dblclick();
    await page.waitForFunction(
      () => window.cornerstoneTools.annotation.state
        .getAllAnnotations()
        .some((a) => a.metadata?.toolName === 'DICOMSRDisplay' && a.metadata?.referencedImageId),
      null,
      { timeout: 60000 },
    );
    await answerPrompt(page, 'No'); // "continue tracking measurements for this study?"
    await page.waitForTimeout(500); // the SVG layer redraws after the prompt closes
    result.annotations = await page.evaluate(() => {
      const cs = window.cornerstone;
      const viewport = cs.getRenderingEngines()[0].getViewports()[0];
      const rect = viewport.element.getBoundingClientRect();
      const shown = viewport.getCurrentImageId();
      return window.cornerstoneTools.annotation.state
        .getAllAnnotations()
        .filter((a) => a.metadata?.toolName === 'DICOMSRDisplay')
        .map((a) => {
          const renderable = a.data.renderableData || {};
          const graphicType = Object.keys(renderable)[0] ?? null;
          const points = graphicType ? renderable[graphicType].flat() : [];
          const onScreen = a.metadata.referencedImageId === shown;
          return {
            label: a.data.label ?? null,
            labels: (a.data.labels || []).map((l) => `${l.label}: ${l.value}`),
            trackingUid: a.data.TrackingUniqueIdentifier ?? null,
            graphicType,
            referencedImageId: a.metadata.referencedImageId ?? null,
            shown: onScreen,
            points,
            page: onScreen
              ? points.map((p) => {
                const c = viewport.worldToCanvas(p);
                return [c[0] + rect.left, c[1] + rect.top];
              })
              : [],
          };
        });
    });
  } else if (request.action === 'draw') {
    await page.locator(`[data-series="${request.imageSeries}"]`).first().dblclick();
    await page.waitForFunction(
      (sop) => {
        const viewport = window.cornerstone.getRenderingEngines()[0]?.getViewports()[0];
        return viewport?.getImageIds?.().some((id) => id.includes(sop));
      },
      request.sop,
      { timeout: 60000 },
    );
    // The measurements panel first: opening it narrows the viewport.
    await page.locator('[data-cy="trackedMeasurements-btn"]').click();
    await page.locator('[data-cy="trackedMeasurements-panel"]').first().waitFor({ timeout: 20000 });
    const tool = request.tool ?? 'RectangleROI';
    const path = await page.evaluate(async ({ sop, points }) => {
      const cs = window.cornerstone;
      const viewport = cs.getRenderingEngines()[0].getViewports()[0];
      const index = viewport.getImageIds().findIndex((id) => id.includes(sop));
      await viewport.setImageIdIndex(index);
      viewport.render();
      const imageId = viewport.getCurrentImageId();
      const rect = viewport.element.getBoundingClientRect();
      return points.map((point) => {
        const world = cs.utilities.imageToWorldCoords(imageId, point);
        const canvas = viewport.worldToCanvas(world);
        return [canvas[0] + rect.left, canvas[1] + rect.top];
      });
    }, { sop: request.sop, points: request.path });
    await page.waitForTimeout(300);
    await page.locator('[data-cy="MeasurementTools-split-button-secondary"]').click();
    await page.locator(`[data-cy="${tool}"]`).click();
    const stroke = tool === 'RectangleROI' ? path : [...path, path[0]];
    await page.mouse.move(...stroke[0]);
    await page.mouse.down();
    for (let edge = 1; edge < stroke.length; edge += 1) {
      const [[x0, y0], [x1, y1]] = [stroke[edge - 1], stroke[edge]];
      for (let step = 1; step <= 12; step += 1) {
        await page.mouse.move(x0 + ((x1 - x0) * step) / 12, y0 + ((y1 - y0) * step) / 12);
      }
    }
    await page.mouse.up();
    await answerPrompt(page, 'Yes'); // "Track measurements for this series?"
    await page.waitForFunction(
      () => window.services.measurementService.getMeasurements().length > 0,
      null,
      { timeout: 20000 },
    );
    result.measurements = await page.evaluate(() => window.services.measurementService
      .getMeasurements()
      .map((m) => ({ toolName: m.toolName, points: m.points, sop: m.SOPInstanceUID })));
    await page.getByText('Create SR', { exact: true }).click();
    await page.getByPlaceholder('Report name').fill(request.reportName);
    const stow = page.waitForResponse(
      (r) => r.request().method() === 'POST' && r.url().includes('/dicom-web/studies'),
      { timeout: 60000 },
    );
    await page.getByRole('button', { name: 'Save', exact: true }).click();
    const answer = await stow;
    result.stowStatus = answer.status();
  } else {
    throw new Error(`unknown action ${request.action}`);
  }
  if (request.screenshot) await page.screenshot({ path: request.screenshot });
  result.totalMs = Date.now() - started;
} catch (error) {
  result.error = String(error?.stack ?? error);
  // what the page showed when it failed, for the test's artifacts
  if (page && request.screenshot) await page.screenshot({ path: request.screenshot }).catch(() => {});
} finally {
  await browser.close();
}
result.log = log.slice(-60);
process.stdout.write(`${JSON.stringify(result)}\n`);

async function answerPrompt(page, answer) {
  const button = page.getByRole('button', { name: answer, exact: true });
  try {
    await button.click({ timeout: 15000 });
  } catch {
    log.push(`no prompt to answer ${answer}`);
  }
}
