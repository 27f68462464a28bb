"""A YAML reader that reports every problem as ``FILE:LINE: field.path: why``.

It knows nothing about relayd. A schema is a frozen dataclass whose fields carry their key,
reader, default and doc (``key``), so each key is declared once. YAML is composed into nodes
because only nodes keep line numbers, and *all* problems are collected before failing: an
operator fixing a config wants the whole list at once. ``${VAR}`` / ``${VAR:-default}`` are
swapped for inert placeholders before composing and expanded per scalar, so a value can never
change the document's structure. Values from a variable used in a secret field are never
printed in an error, wherever else that variable shows up; nor are URL userinfo and queries.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import yaml

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}\n]*))?\}")
_STR, _NULL, _INT = "tag:yaml.org,2002:str", "tag:yaml.org,2002:null", "tag:yaml.org,2002:int"
_INT_CHARS = 1000  # no config number needs more; Python refuses ints over 4300 digits anyway
REQUIRED: Any = dataclasses.MISSING

Reader = Callable[["Walker", yaml.Node, str, Any], Any]
Items = dict[str, tuple[yaml.Node, yaml.Node]]
Finish = Callable[["Walker", yaml.Node, str, dict[str, Any], Items], None]


_SHOWN, _PATH_MAX, _WHY_MAX = 80, 200, 1000  # characters of a value, a field path, a reason in a message
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _printable(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 0: the file as a whole (cannot read it), printed without a line
    path: str
    why: str

    def __str__(self) -> str:
        """One line whatever the file holds: control characters (a key "x\\nf.yaml:1: ...",
        ESC sequences) are escaped, so no error line can be forged, and a path or reason
        is cut short (a 50 MB key made a 50 MB line)."""
        at = f"{self.file}:{self.line}:" if self.line else f"{self.file}:"
        return _printable(f"{at} {_cut(self.path, _PATH_MAX) + ': ' if self.path else ''}{_cut(self.why, _WHY_MAX)}")


MAX_PROBLEMS = 100  # problems listed; the rest are counted
_MORE = Problem("", 0, "", "")  # stands in the list for each problem past MAX_PROBLEMS


class ConfigError(Exception):
    """Every problem found in one config file."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def key(default: Any = REQUIRED, read: Reader | None = None, doc: str = "",
        name: str | None = None, repr: bool = True) -> Any:
    """Declare a config key on a dataclass field: its reader, default and doc, once."""
    kw: dict[str, Any] = {"metadata": {"read": read, "doc": doc, "key": name}, "repr": repr}
    if default is not REQUIRED:
        kw["default"] = default
    return dataclasses.field(**kw)


def keys_of(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """YAML key -> dataclass field, for the fields that are config keys."""
    return {f.metadata.get("key") or f.name: f for f in dataclasses.fields(cls) if f.metadata.get("read")}


def suggest(word: str, options: Iterable[str]) -> str:
    """A "did you mean"; none for a long word (difflib is quadratic, and no key is long)."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6) if len(word) <= 100 else []
    return f"; did you mean {close[0]!r}?" if close else ""


def redact_url(text: str, origin_only: bool = False) -> str:
    """A URL fit for an error message: no userinfo, query or fragment (all can carry keys);
    origin_only (a proxy's URL, whose path can be a token too): scheme://host:port only."""
    scheme, sep, rest = text.rpartition("://") if "://" in text else ("", "", text)
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    cut = re.search(r"[/?#]" if origin_only else r"[?#]", rest)
    if cut:
        rest = rest[: cut.start()] + cut.group() + "***"
    return f"{scheme}{sep}{rest}"


def show(v: Any) -> str:
    """How a wrong value is named in an error: a kind for structures, else its repr, cut to
    80 characters (a message quoting a 50 MB value was 50 MB long).

    An int past Python's 4300-digit str limit cannot be repr'd at all (repr raises)."""
    if v is None or isinstance(v, (bool, list, dict)):
        return {type(None): "nothing (null)", bool: "a boolean", list: "a list", dict: "a mapping"}[type(v)]
    try:
        return _cut(repr(v), _SHOWN)
    except ValueError:
        return "a number too large to show"


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "mapping", yaml.SequenceNode: "list"}.get(type(node), "value")


def is_null(node: yaml.Node) -> bool:
    """A plain null: empty, ``~`` or ``null`` (a quoted "null" is text)."""
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL and not node.style


def controls(s: str) -> int | None:
    """The first control character (< 0x20 but tab, or 0x7f): never valid in a header."""
    return next((ord(c) for c in s if (c < " " and c != "\t") or c == "\x7f"), None)


@dataclasses.dataclass
class _At:
    """A place in the text, as a YAML mark gives it (``Walker.line_of``)."""

    index: int
    line: int = 0


class Walker:
    """Turns composed YAML nodes into typed values, recording problems instead of raising."""

    def __init__(self, file: str, env: Mapping[str, str]):
        self.file, self.env = file, env
        self.problems: list[Problem] = []
        self.vars: list[tuple[str | None, str | None]] = []
        self.secret_vars: set[str] = set()
        self.secrets: set[str] = set()
        self.outside_secrets: set[str] = set()  # secrets read from files or credentials
        self.ctx: dict[str, Any] = {}  # facts later sections of a schema look at
        self._held: list[tuple[str, frozenset[str]]] = []  # values printed or hidden at the end
        self._ctor = yaml.SafeLoader("")
        self._text = ""  # the text composed, when its line numbers need counting (``line_of``)
        self._mark("")

    def _mark(self, text: str) -> None:
        """Placeholders carry a random token absent from the text: literal text that looks
        like a placeholder (``__yamlconf_var_0__``) must stay text, never a variable's value."""
        while (token := secrets.token_hex(8)) in text:
            pass
        self._placeholder = re.compile(rf"__yamlconf_var_{token}_(\d+)__")
        self._held_rx = re.compile(rf"\x00{token}:(\d+)\x00")
        self._token = token

    def error(self, node: yaml.Node | None, path: str, why: str) -> None:
        if self.full():  # counted, not kept
            self.problems.append(_MORE)
            return
        self.problems.append(Problem(self.file, self.line_of(node.start_mark) if node else 1, path, why))

    def line_of(self, mark: Any) -> int:
        """The line an editor shows.  YAML (1.1) also breaks lines at U+0085, U+2028 and
        U+2029, which editors show inside a line: after one, every line number YAML gave
        was too high (review 80); then lines are counted in the text, as editors do."""
        if mark is None:
            return 1
        if not self._text:
            return mark.line + 1
        head = self._text[:mark.index]
        return head.count("\n") + head.count("\r") - head.count("\r\n") + 1

    def full(self) -> bool:
        """Enough problems are kept to say what is wrong: a 4 MiB file of bad lines took a
        minute and 2 GB to list them all (one reload stalled the main process past the
        watchdog), and their log line was 300 MB."""
        return len(self.problems) >= MAX_PROBLEMS

    def run(self, text: str, walk: Callable[[Walker, yaml.Node], Any]) -> Any:
        """Compose text, walk its root; raise ConfigError with every problem."""
        def hide(m: re.Match[str]) -> str:
            self.vars.append((m.group(1), m.group(2)) if m.group(0) != "$$" else (None, None))
            return f"__yamlconf_var_{self._token}_{len(self.vars) - 1}__"
        self._mark(text)
        text = _VAR.sub(hide, text)
        self._text = text if any(c in text for c in "\x85\u2028\u2029") else ""
        try:
            docs = [d for d in yaml.compose_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
                    if d]
        except yaml.reader.ReaderError as exc:  # not a MarkedYAMLError: its place is a position
            line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else 1
            char = exc.character
            what = f"#x{char:04x}" if isinstance(char, int) else repr(char)
            raise ConfigError([Problem(self.file, line, "",
                                       f"YAML error: character {what} is not allowed in YAML ({exc.reason})")]) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            why = " ".join(x for x in (exc.context, exc.problem) if x)
            if self._text:  # (a break only YAML sees is the likely cause)
                at = next(i for i, c in enumerate(self._text) if c in "\x85\u2028\u2029")
                why += (f" (line {self.line_of(_At(at))} holds U+{ord(self._text[at]):04X}, which "
                        f"YAML reads as a line break: remove it)")
            raise ConfigError([Problem(self.file, self.line_of(mark), "",
                                       f"YAML syntax error: {why}")]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([Problem(self.file, 1, "", f"YAML error: {exc}")]) from None
        if len(docs) != 1:
            line, why = (self.line_of(docs[1].start_mark), "more than one YAML document in the file") \
                if docs else (1, "config is empty")
            raise ConfigError([Problem(self.file, line, "", why)])
        result = walk(self, docs[0])
        if self.problems or result is None:
            raise ConfigError(self.finish() or [Problem(self.file, 1, "", "config is invalid")])
        return result

    # -- interpolation and secrets

    def used_vars(self, node: yaml.Node) -> frozenset[str]:
        return frozenset(n for i in self._placeholder.findall(str(getattr(node, "value", "")))
                         if (n := self.vars[int(i)][0]) is not None)

    def expand(self, node: yaml.ScalarNode, path: str) -> str | None:
        missing: list[str] = []

        def sub(m: re.Match[str]) -> str:
            name, default = self.vars[int(m.group(1))]
            value = "$" if name is None else self.env.get(name)  # name None: "$$"
            if value is None or (value == "" and default is not None):
                if default is None:
                    missing.append(str(name))
                return default or ""
            return value

        if "${" in node.value or any("${" in (self.vars[int(i)][1] or "")
                                     for i in self._placeholder.findall(node.value)):
            # What _VAR did not take (a comment is not a value: only values are checked).
            self.error(node, path, "malformed variable reference: write ${NAME} or "
                                   "${NAME:-default} (no variable inside a default; $$ for a literal $)")
            return None
        out = self._placeholder.sub(sub, node.value)
        for name in missing:
            self.error(node, path, f"environment variable {name} is not set "
                                   f"(write ${{{name}:-}} for an optional value)")
        return None if missing else out

    def mark_secret(self, node: yaml.Node, value: str | None) -> None:
        """A credential: its value and the variables it came from are never printed."""
        names = self.used_vars(node)
        self.secret_vars |= names
        if value:
            self.secrets.add(value)
            self.secrets.update(self.env[n] for n in names if self.env.get(n))

    def hold(self, node: yaml.Node, value: Any) -> str:
        """A value for an error text; finish() decides whether it may be printed."""
        names = self.used_vars(node)
        if not names:
            return show(value)
        self._held.append((show(value), names))
        return f"\x00{self._token}:{len(self._held) - 1}\x00"

    def finish(self) -> list[Problem]:
        """The problems sorted by line, values from secret variables blanked out."""
        def fill(m: re.Match[str]) -> str:
            text, names = self._held[int(m.group(1))]
            hidden = sorted(names & self.secret_vars)
            return f"(value from ${{{hidden[0]}}} hidden)" if hidden else text
        # A secret from outside the file (a variable used in a secret field, a key file or
        # credential), wherever a message quotes it; a literal value is in the file anyway,
        # and header values are secret fields too, "openai" among them.
        outside = {self.env.get(n) or "" for n in self.secret_vars} | self.outside_secrets
        secrets = sorted((v for v in outside if len(v) >= 4), key=len, reverse=True)

        def scrub(text: str) -> str:
            for secret in secrets:
                text = text.replace(secret, "(secret hidden)")
            for secret in secrets:  # a value cut short by show() can end in a secret's start
                for n in range(min(len(secret) - 1, _SHOWN), 3, -1):
                    text = text.replace(secret[:n] + "\u2026", "(secret hidden)\u2026")
            return text
        out = [dataclasses.replace(p, path=scrub(p.path), why=scrub(self._held_rx.sub(fill, p.why)))
               for p in self.problems if p is not _MORE]
        out.sort(key=lambda p: p.line)
        if len(out) < len(self.problems):
            out.append(Problem(self.file, 0, "", f"... and {len(self.problems) - len(out)} more problems"))
        return out

    # -- scalars

    def scalar(self, node: yaml.Node, path: str) -> tuple[bool, Any]:
        """(ok, python value) of a scalar node after interpolation, YAML-typed."""
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, path, f"expected a single value, got a {kind(node)}")
            return False, None
        text = self.expand(node, path)
        if text is None:
            return False, None
        if text != node.value:  # a plain scalar is typed again after substitution; a tag stays
            tag = (self._ctor.resolve(yaml.ScalarNode, text, (True, False)) if not node.style else _STR) \
                if self.implicit(node) else node.tag
            node = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark, node.style)
        if node.tag == _INT and len(node.value) > _INT_CHARS:
            self.error(node, path, f"number too large (more than {_INT_CHARS} digits)")
            return False, None
        try:
            return True, self._ctor.construct_object(node)
        except Exception as exc:  # YAML's constructors fail in many ways on bad tagged values
            problem = (getattr(exc, "problem", None) or str(exc).split("\n")[0]) \
                if isinstance(exc, yaml.YAMLError) else f"not a valid !!{node.tag.rsplit(':', 1)[-1]}"
            self.error(node, path, f"cannot read value: {problem}")
            return False, None

    def implicit(self, node: yaml.ScalarNode) -> bool:
        """No explicit tag, or one saying what the value says anyway (``!!str "x"``).

        Quoted values count too: ``!!binary "c2st..."`` or ``!whatever "openai"`` in a string
        field was taken as the plain text, its tag silently ignored."""
        if node.style:
            return node.tag == _STR
        return node.tag == self._ctor.resolve(yaml.ScalarNode, node.value, (True, False))

    def text(self, node: yaml.Node, path: str, nullable: bool = False,
             secret: bool = False) -> tuple[bool, str | None]:
        """A string exactly as written: ``012345``, ``0x1F``, ``1:20`` and ``yes`` stay text.

        An explicit tag (``!!int 5``) is still constructed, so bad tags get caught; a plain
        null (empty, ``~``, ``null``) is null.
        """
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, path, f"expected a single value, got a {kind(node)}")
            return False, None
        if not self.implicit(node):
            ok, v = self.scalar(node, path)
            if ok and not isinstance(v, str):
                got = f"a {type(v).__name__} (value not shown)" if secret else self.hold(node, v)
                self.error(node, path, f"expected a string, got {got}")
            return ok and isinstance(v, str), v if isinstance(v, str) else None
        if is_null(node):
            if not nullable:
                self.error(node, path, "expected a string, got nothing (null)")
            return nullable, None
        value = self.expand(node, path)
        return value is not None, value

    def typed(self, node: yaml.Node, path: str, check: Callable[[Any], Any]) -> Any:
        """check(YAML-typed value); its ValueError text becomes the problem.

        OverflowError too: a huge YAML int turned into a float (a duration) raises it."""
        ok, value = self.scalar(node, path)
        if not ok:
            return None
        try:
            return check(value)
        except (TypeError, ValueError, ArithmeticError) as exc:
            if isinstance(exc, ArithmeticError):
                exc = ValueError(f"too large: {show(value)}")
            head, sep, tail = str(exc).rpartition(show(value))  # the value itself, not a bound
            self.error(node, path, f"{head}{self.hold(node, value)}{tail}" if sep else tail)
            return None

    # -- structures

    def mapping(self, node: yaml.Node, path: str, allowed: Iterable[str] | None) -> Items | None:
        if is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected a mapping, got a {kind(node)}")
            return None
        names = sorted(allowed) if allowed is not None else None
        out: Items = {}
        for knode, vnode in node.value:
            ok, name = self.text(knode, path)
            if not ok or name is None:
                continue
            unprintable = not name.isprintable()  # names go into messages and logs: no line breaks, no ESC
            if unprintable:
                self.error(knode, join(path, name), "a key or name must not contain control characters")
            if names is not None and name not in names:
                if not unprintable:  # (a suggestion is a difflib search: not past the cap)
                    self.error(knode, join(path, name), "unknown key" if self.full() else
                               f"unknown key{suggest(name, names)} (allowed: {', '.join(names)})")
            elif name in out:
                self.error(knode, join(path, name), "duplicate key")
            else:
                out[name] = (knode, vnode)
        return out

    def sequence(self, node: yaml.Node, path: str) -> list[tuple[str, yaml.Node]] | None:
        """(path, node) per item; null is an empty list."""
        if is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, path, f"expected a list, got a {kind(node)}")
            return None
        return [(f"{path}[{i}]", n) for i, n in enumerate(node.value)]

    def build(self, cls: type, node: yaml.Node, path: str, base: Mapping[str, Any] | None = None,
              extra: Mapping[str, Any] | None = None, finish: Finish | None = None,
              at: yaml.Node | None = None) -> Any:
        """An instance of a schema dataclass, or None after recording its problems.

        ``base`` overrides defaults (inherited values); ``extra`` fills the fields that are
        not config keys; ``finish`` checks relations between keys and may edit values;
        ``at`` is where a missing key is reported (a named entry's key, say).
        """
        fields = keys_of(cls)
        items = self.mapping(node, path, fields)
        if items is None:
            return None
        before = len(self.problems)
        values: dict[str, Any] = dict(extra or {})
        for name, f in fields.items():
            default = base[f.name] if base and f.name in base else f.default
            if name in items:
                values[f.name] = f.metadata["read"](self, items[name][1], join(path, name), default)
            elif default is REQUIRED:
                doc = f" ({f.metadata['doc']})" if f.metadata["doc"] else ""
                self.error(at or node, path, f"missing required key {name!r}{doc}")
            else:
                values[f.name] = default
        if finish is not None and len(self.problems) == before:
            finish(self, node, path, values, items)
        return cls(**values) if len(self.problems) == before else None
