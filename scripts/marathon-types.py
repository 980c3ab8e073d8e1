#!/usr/bin/env python3
"""Reads the type libraries of Marathon's RAML specification and writes what a strict reader
of /v2 needs: each type's fields, which are required, and their types (no descriptions).

    scripts/marathon-types.py ../shared/reference/marathon-rest-api/v2/types \
        > crates/node-core/src/api/marathon_types.json

Forms of a type in the output: "string" "number" "integer" "boolean" "any" "nil",
{"enum": [..]}, {"array": T}, {"union": [T, ..]}, {"ref": "file#Type"},
{"object": {"props": {name: {"type": T, "required": bool}}, "extra": T or null, "base": [T]}}.
"""

import json
import os
import re
import sys

import yaml

BUILTIN = {
    "string": "string",
    "datetime": "string",
    "date-only": "string",
    "datetime-only": "string",
    "time-only": "string",
    "number": "number",
    "integer": "integer",
    "boolean": "boolean",
    "any": "any",
    "nil": "nil",
    "file": "string",
}


def split_union(expr):
    """Splits `A | (B | C)[]` at the top-level bars."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(expr):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(expr[start:i])
            start = i + 1
    parts.append(expr[start:])
    return [p.strip() for p in parts]


class Library:
    def __init__(self, directory):
        self.directory = directory
        self.files = {}

    def load(self, name):
        if name not in self.files:
            with open(os.path.join(self.directory, name)) as f:
                self.files[name] = yaml.safe_load(f) or {}
        return self.files[name]

    def expr(self, expr, file):
        """A type expression of `file` (a string) as a node."""
        expr = expr.strip()
        parts = split_union(expr)
        if len(parts) > 1:
            return {"union": [self.expr(p, file) for p in parts]}
        if expr.endswith("[]"):
            return {"array": self.expr(expr[:-2], file)}
        if expr.startswith("(") and expr.endswith(")"):
            return self.expr(expr[1:-1], file)
        if expr in BUILTIN:
            return BUILTIN[expr]
        if expr == "object":
            return {"object": {"props": {}, "extra": "any", "base": []}}
        if expr == "array":
            return {"array": "any"}
        if "." in expr:
            alias, name = expr.split(".", 1)
            uses = self.load(file).get("uses") or {}
            return {"ref": f"{uses[alias]}#{name}"}
        return {"ref": f"{file}#{expr}"}

    def decl(self, decl, file):
        """A type declaration (a string, a map, or nothing) as a node."""
        if decl is None:
            return "any"
        if isinstance(decl, str):
            return self.expr(decl, file)
        if isinstance(decl, list):
            return {"union": [self.decl(d, file) for d in decl]}
        base = decl.get("type")
        if "properties" in decl or base == "object":
            props, extra = {}, None
            for name, value in (decl.get("properties") or {}).items():
                if re.fullmatch(r"/.*/", name):
                    extra = self.decl(value, file)
                    continue
                required = not name.endswith("?")
                name = name.rstrip("?")
                if isinstance(value, dict) and value.get("required") is False:
                    required = False
                props[name] = {"type": self.decl(value, file), "required": required}
            bases = []
            if isinstance(base, str) and base != "object":
                bases = [self.expr(base, file)]
            if "properties" not in decl and base == "object":
                extra = "any"
            return {"object": {"props": props, "extra": extra, "base": bases}}
        if "enum" in decl:
            return {"enum": decl["enum"]}
        if "items" in decl or base == "array":
            return {"array": self.decl(decl.get("items"), file)}
        if base is None:
            return "any"
        return self.decl(base, file)


def main():
    directory = sys.argv[1]
    lib = Library(directory)
    types = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".raml"):
            continue
        for tname, decl in (lib.load(name).get("types") or {}).items():
            types[f"{name}#{tname}"] = lib.decl(decl, name)
    json.dump({"types": types}, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
