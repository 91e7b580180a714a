"""The DICOM audit message schema (PS3.15 A.5.1) as an lxml validator."""

from __future__ import annotations

import functools

from lxml import etree

from dicom_node.audit import SCHEMA_PATH


@functools.cache
def audit_schema() -> etree.RelaxNG:
    # The standard writes its '##' documentation comments after the values they document;
    # rnc2rng only takes them before a pattern. As plain comments they mean the same.
    text = SCHEMA_PATH.read_text().replace("##", "#")
    return etree.RelaxNG.from_rnc_string(text)


def assert_valid(message: str) -> etree._Element:
    document = etree.fromstring(message.encode())
    schema = audit_schema()
    assert schema.validate(document), f"{schema.error_log}\n{message}"
    return document
