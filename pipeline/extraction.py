"""Structured extraction (`kind = "extract"`): each task's JSON Schema, checked once in the driver, and its
answers as a typed column.

    schemas = load_schemas(spec.tasks, spec.storage)      # read, checked, or a SpecError naming the fix
    types = ExtractionTypes.of(schemas)                  # extract_<name> columns and their Arrow types
    ParseExtractions(tasks, schemas)                     # the step after the model: text -> typed value

A schema is checked twice before any page is read: against the JSON Schema meta-schema (`jsonschema`),
and by llguidance, the library that constrains decoding (pipeline/model/grammar.py), which refuses
keywords it cannot enforce (`uniqueItems`, `not`, `if`/`then`, ...): a keyword it would ignore would
leave the task silently unconstrained, so it stops the job instead, naming the keyword.

The model stage makes every answer of an extract task follow its schema token by token, so an answer that
ended by itself parses and validates. `ParseExtractions` still parses and validates every `ok` row (a
row copied from an earlier run, or by dedup, passes the same door) and turns the ones that do not into
error rows that keep their text: above all an answer cut at `max_new_tokens` before its JSON closed.

Arrow types follow the schema: object -> struct (a required property not null), array -> list,
integer -> int64, number -> double, boolean -> bool, string -> string, null -> null, `anyOf`/a type list
with null -> that type, nullable; integer with number -> double. A part of a schema that has no one
Arrow type (an object without `properties`, `anyOf` over different types, a recursive `$ref`) is held as
its JSON text (a string). A struct holds the schema's properties; other keys stay in `text`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa

from scriptorium.connectors.storage import describe_error, read_bytes
from scriptorium.core.errors import SpecError
from scriptorium.core.schema import RESULT_SCHEMA, rows_of, table_from_rows
from scriptorium.core.spec import StorageSpec, TaskSpec

COLUMN_PREFIX = "extract_"
INT64_RANGE = (-(2**63), 2**63 - 1)
# How the JSON of an answer is laid out: compact (no whitespace between tokens). Whitespace carries
# nothing, costs tokens, and a model free to emit it can spend every token of an answer on it.
GRAMMAR_OPTIONS = {"whitespace_flexible": False}
SCHEMA_SETTING = "json_schema"  # an extract task's generation settings name its schema by this key (its digest)


def column_name(task: TaskSpec) -> str:
    return COLUMN_PREFIX + task.task_name


def extract_tasks(tasks: list[TaskSpec]) -> list[TaskSpec]:
    return [t for t in tasks if t.kind == "extract"]


def schema_digest(schema: dict) -> str:
    """A short hash of a schema's canonical JSON: part of an extract task's generation settings, so an
    answer made under another schema is never reused for this one (dedup across runs)."""
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:16]


def is_extract_answer(generation: str | None) -> bool:
    """Whether a row's generation settings (its `generation` column) are an extract task's: they name its
    schema (`PromptPlan.settings`)."""
    return bool(generation) and SCHEMA_SETTING in json.loads(generation)


# -- the schemas, read and checked in the driver ------------------------------------------------------------
def load_schemas(tasks: list[TaskSpec], storage: StorageSpec | None = None) -> dict[str, dict]:
    """Each extract task's JSON Schema, by task name: read (a path or URI, or the inline table), checked
    against the meta-schema and by the grammar library. Any problem is a SpecError of one line."""
    schemas = {}
    for task in extract_tasks(tasks):
        schema = read_schema(task, storage)
        check_schema(task.task_name, schema)
        schemas[task.task_name] = schema
    return schemas


def read_schema(task: TaskSpec, storage: StorageSpec | None) -> dict:
    source = task.json_schema
    name = task.task_name
    if isinstance(source, dict):
        return source
    try:
        data = read_bytes(source, storage)
    except Exception as exc:
        raise SpecError(f"task {name!r}: schema {source} cannot be read: {describe_error(exc, source)}") from None
    try:
        schema = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"task {name!r}: schema {source} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise SpecError(f"task {name!r}: schema {source} must be a JSON object, not {type(schema).__name__}")
    return schema


def check_schema(name: str, schema: dict) -> None:
    """Valid JSON Schema (draft 2020-12), and every keyword enforceable while decoding."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        raise SpecError(f"task {name!r}: invalid JSON Schema at {where}: {exc.message}") from None
    problem = grammar_problem(schema)
    if problem:
        raise SpecError(f"task {name!r}: the schema cannot constrain decoding: {problem}")


def grammar_problem(schema: dict) -> str:
    """Why llguidance cannot compile `schema` into a grammar ("" when it can): unimplemented keywords are
    an error there, never ignored."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=GRAMMAR_OPTIONS)
    except ValueError as exc:
        return str(exc)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if not is_error:
        return ""
    message = messages[0].splitlines()[0] if messages else "unknown error"
    if "Unimplemented keys" in message:
        keys = message.split("Unimplemented keys:", 1)[1].strip().split(";")[0]
        return f"keyword(s) {keys} are not supported (remove them, or enforce them after the run)"
    return message


# -- Arrow types ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Typed:
    """The Arrow type of a part of a schema, and how a JSON value of that part becomes an Arrow value."""

    type: pa.DataType
    nullable: bool
    convert: Callable[[Any], Any]


JSON_TEXT = Typed(pa.string(), True, lambda v: None if v is None else json.dumps(v, ensure_ascii=False))


def _int64(value):
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{value!r} is not an integer")
    value = int(value)
    if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        raise ValueError(f"integer {value} is outside the range of int64")
    return value


def _float64(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"number {value} is outside the range of double") from None


def _of(kind: type, name: str):
    def convert(value):
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{value!r} is not a {name}")
        return value
    return convert


SCALARS = {
    "string": (pa.string(), _of(str, "string")),
    "integer": (pa.int64(), _int64),
    "number": (pa.float64(), _float64),
    "boolean": (pa.bool_(), _of(bool, "boolean")),
}


def arrow_typed(schema: dict) -> Typed:
    """The Arrow type of a whole schema (the column's)."""
    return _typed(schema, schema, ())


def _typed(node, root: dict, refs: tuple) -> Typed:
    if not isinstance(node, dict):  # `true` or `false` as a schema
        return JSON_TEXT
    if "$ref" in node:
        ref = node["$ref"]
        if ref in refs or not ref.startswith("#"):
            return JSON_TEXT  # recursive, or outside this document
        target = root
        for part in ref.lstrip("#").strip("/").split("/") if ref != "#" else []:
            target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
        return _typed({**target, **{k: v for k, v in node.items() if k != "$ref"}}, root, refs + (ref,))
    if "const" in node:
        return _of_values([node["const"]])
    if "enum" in node:
        return _of_values(node["enum"])
    for key in ("anyOf", "oneOf"):
        if key in node:
            return _union([_typed({**{k: v for k, v in node.items() if k != key}, **variant}, root, refs)
                           for variant in node[key]])
    kinds = node.get("type")
    if isinstance(kinds, list):
        return _union([_typed({**node, "type": kind}, root, refs) for kind in kinds])
    if kinds == "null":
        return Typed(pa.null(), True, lambda v: None)
    if kinds in SCALARS:
        arrow, convert = SCALARS[kinds]
        return Typed(arrow, False, convert)
    if kinds == "array" and isinstance(node.get("items"), dict) and "prefixItems" not in node:
        item = _typed(node["items"], root, refs)
        return Typed(pa.list_(pa.field("item", item.type, nullable=True)), False,
                     lambda v: [None if x is None else item.convert(x) for x in _of(list, "array")(v)])
    if kinds == "object" and node.get("properties"):
        required = set(node.get("required", []))
        fields = {name: _typed(sub, root, refs) for name, sub in node["properties"].items()}
        struct = pa.struct([pa.field(name, f.type, nullable=f.nullable or name not in required)
                            for name, f in fields.items()])

        def convert(value):
            value = _of(dict, "object")(value)
            return {name: None if value.get(name) is None else f.convert(value[name]) for name, f in fields.items()}
        return Typed(struct, False, convert)
    return JSON_TEXT


def _of_values(values: list) -> Typed:
    """The type of a const or an enum: of its values' JSON types."""
    names = {"string" if isinstance(v, str) else "boolean" if isinstance(v, bool) else
             "integer" if isinstance(v, int) else "number" if isinstance(v, float) else
             "null" if v is None else "other" for v in values}
    return _union([_typed({"type": name}, {}, ()) if name != "other" else JSON_TEXT for name in names])


def _union(variants: list[Typed]) -> Typed:
    nullable = any(v.nullable for v in variants)
    concrete = [v for v in variants if v.type != pa.null()]
    types = {str(v.type) for v in concrete}
    if not concrete:
        return Typed(pa.null(), True, lambda v: None)
    if len(types) == 1:
        one = concrete[0]
        return Typed(one.type, nullable or one.nullable, one.convert)
    if types == {"int64", "double"}:
        return Typed(pa.float64(), nullable, _float64)
    return JSON_TEXT


@dataclass(frozen=True)
class ExtractionTypes:
    """The job's extract columns: name -> typed, in task order."""

    columns: dict[str, Typed] = field(default_factory=dict)

    @classmethod
    def of(cls, tasks: list[TaskSpec], schemas: dict[str, dict]) -> "ExtractionTypes":
        return cls({column_name(t): arrow_typed(schemas[t.task_name]) for t in extract_tasks(tasks)})

    def fields(self) -> list[pa.Field]:
        return [pa.field(name, typed.type, nullable=True) for name, typed in self.columns.items()]

    def result_schema(self) -> pa.Schema:
        """The output's schema: the result columns, then one column per extract task."""
        return pa.schema(list(RESULT_SCHEMA) + self.fields())


# -- answers to typed values ---------------------------------------------------------------------------------
class ParseExtractions:
    """Result rows in, the same rows out with each extract task's answer parsed into its typed column
    (null on every other row). An `ok` answer that is cut (`truncated`), does not parse or does not
    validate becomes an error row (stage "extract") that keeps its text."""

    input_schema = RESULT_SCHEMA

    def __init__(self, tasks: list[TaskSpec], schemas: dict[str, dict]):
        self.types = ExtractionTypes.of(tasks, schemas)
        self.output_schema = self.types.result_schema()
        self.schemas = {column_name(t): schemas[t.task_name] for t in extract_tasks(tasks)}
        self.column_of_task = {t.task_name: column_name(t) for t in extract_tasks(tasks)}
        self._validators: dict[str, Any] = {}

    def __call__(self, results: pa.Table) -> Iterator[pa.Table]:
        rows = rows_of(results)
        for row in rows:
            column = self.column_of_task.get(row["task"])
            if column is not None and row["status"] == "ok":
                self.parse(row, column)
        yield table_from_rows(rows, self.output_schema)

    def parse(self, row: dict, column: str) -> None:
        if row.get("truncated"):
            return _fail(row, f"the answer was cut at max_new_tokens = {row.get('max_new_tokens')} before its JSON "
                              "closed: raise max_new_tokens")
        try:
            value = json.loads(row["text"] or "")
        except json.JSONDecodeError as exc:
            return _fail(row, f"the answer is not JSON: {exc}")
        problem = next(iter(self.validator(column).iter_errors(value)), None)
        if problem is not None:
            where = "/".join(str(p) for p in problem.absolute_path) or "the top level"
            return _fail(row, f"the answer does not follow the schema at {where}: {problem.message[:200]}")
        try:
            row[column] = self.types.columns[column].convert(value)
        except ValueError as exc:
            _fail(row, f"the answer has no value of its column's type: {exc}")

    def validator(self, column: str):
        if column not in self._validators:
            import jsonschema

            self._validators[column] = jsonschema.Draft202012Validator(self.schemas[column])
        return self._validators[column]


def _fail(row: dict, reason: str) -> None:
    row.update(status="error", stage="extract", error=reason)
