"""The vendored EWS schema is Microsoft's, unchanged, and the patches applied at load time are the two known ones."""

import hashlib
import re

from lxml import etree

from gateway.simulator.schema import MNS, SCHEMA_DIR, TNS, child_order, ews_schema, validate

SHA256 = {
    "messages.xsd": "e8f2bbef54150e173336e2af377d680e3096843b5e3de9bbce000c0fcceda23f",
    "types.xsd": "a062af91308d8158c2497433dd4ec524b8c4c9e545f471bf13eaf19a270eb950",
}


def test_vendored_schema_files_are_byte_for_byte_microsofts():
    for name, digest in SHA256.items():
        assert hashlib.sha256((SCHEMA_DIR / name).read_bytes()).hexdigest() == digest


def test_the_copy_in_the_package_records_its_own_provenance():
    """The package's copy is the reference (nothing outside the repository is needed): its README names the
    source and the sums, and they are the ones the files have."""
    readme = (SCHEMA_DIR / "README.md").read_text()
    assert "jamesiarmes/php-ews" in readme
    for name, digest in SHA256.items():
        assert re.search(rf"^\s+{re.escape(name)}\s+{digest}$", readme, re.MULTILINE), name
        assert hashlib.sha256((SCHEMA_DIR / name).read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.xsd")) == sorted(SHA256)


def test_schema_accepts_a_valid_request_and_names_the_violation_of_an_invalid_one():
    ews_schema()
    ok = etree.fromstring(
        f'<m:GetFolder xmlns:m="{MNS}" xmlns:t="{TNS}"><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape>'
        '</m:FolderShape><m:FolderIds><t:DistinguishedFolderId Id="calendar"/></m:FolderIds></m:GetFolder>')
    assert validate(ok) is None
    bad = etree.fromstring(
        f'<m:GetFolder xmlns:m="{MNS}" xmlns:t="{TNS}"><m:FolderIds><t:DistinguishedFolderId Id="nowhere"/>'
        '</m:FolderIds></m:GetFolder>')
    problem = validate(bad)
    assert problem is not None and "FolderShape" in problem


def test_transitions_patch_keeps_time_zone_definitions_valid():
    tzdef = etree.fromstring(
        f'<t:TimeZoneContext xmlns:t="{TNS}"><t:TimeZoneDefinition Id="W. Europe Standard Time">'
        '<t:Periods><t:Period Bias="-PT1H" Name="Standard" Id="Std"/></t:Periods>'
        '<t:TransitionsGroups><t:TransitionsGroup Id="0"><t:Transition><t:To Kind="Period">Std</t:To>'
        '</t:Transition></t:TransitionsGroup></t:TransitionsGroups>'
        '<t:Transitions><t:Transition><t:To Kind="Group">0</t:To></t:Transition></t:Transitions>'
        '</t:TimeZoneDefinition></t:TimeZoneContext>')
    assert validate(tzdef) is None


def test_child_order_follows_the_schema_including_base_types():
    order = child_order("CalendarItemType")
    assert order["ItemId"] < order["Subject"] < order["UID"] < order["Start"] < order["End"] < order["Organizer"]
