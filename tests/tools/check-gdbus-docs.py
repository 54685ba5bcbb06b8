#!/usr/bin/env python3
"""Checks that gdbus-codegen's documentation of an introspection XML carries every element.

    check-gdbus-docs.py XML DOCBOOK_DIR ERRORS...

DOCBOOK_DIR holds `gdbus-codegen --generate-docbook doc XML`'s output (DocBook keeps every
argument; gdbus-codegen's RST output leaves out-arguments out). Every method, signal and
property must have a description, every argument one of its own (gdbus-codegen keeps only
single-line `@arg:` docs: a wrapped one loses its rest and every argument after it), and
every error name in ERRORS must appear. Exits 1 listing what is missing."""

import pathlib
import sys
import xml.etree.ElementTree as ET


def text(el: ET.Element) -> str:
    return "".join(el.itertext()).strip()


def main() -> int:
    xml, doc_dir, errors = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
    missing, everything = [], ""
    for iface in ET.parse(xml).getroot().iter("interface"):
        name = iface.get("name")
        path = doc_dir / f"doc-{name}.xml"
        everything += path.read_text()
        # The DocBook's sections by id (gdbus-codegen's: dots of the interface name as '-').
        sections = {s.get("id"): s for s in ET.parse(path).getroot().iter("refsect2")}
        dashed = name.replace(".", "-")
        for kind in ("method", "signal", "property"):
            for el in iface.iter(kind):
                sid = f"gdbus-{kind}-{dashed}.{el.get('name')}"
                sect = sections.get(sid)
                if sect is None:
                    missing.append(f"{kind} {name}.{el.get('name')}: no section {sid}")
                    continue
                if not any(text(p) for p in sect.findall("para")):
                    missing.append(f"{kind} {name}.{el.get('name')}: no description")
                documented = {}
                for entry in sect.iter("varlistentry"):
                    param = entry.find("term/literal/parameter")
                    if param is not None:
                        documented[param.text] = text(entry.find("listitem"))
                for arg in el.iter("arg"):
                    if not documented.get(arg.get("name")):
                        missing.append(f"{kind} {name}.{el.get('name')}: argument {arg.get('name')} undocumented")
    for e in errors:
        if e not in everything:
            missing.append(f"error {e} not in the documentation")
    for m in missing:
        print(m)
    print(f"check-gdbus-docs: {len(missing)} missing")
    return 1 if missing else 0


sys.exit(main())
