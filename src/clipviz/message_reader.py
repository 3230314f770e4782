"""How `error_messages` reads the package's messages from its source: the catalogue's records
(a message's template, kind and site; the error sites whose text cannot be read) and the
`ast` walk that finds them (see `clipviz.error_messages` for what counts as a message and how
a template is made)."""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

_HOLE = "\ue000"  # a value filled in at run time, until templates are finished
_MAX_VARIANTS = 16
_MARKUP = re.compile(r"\[/?(?:bold |dim |italic )?(?:red|yellow|green|cyan|magenta|bold|dim)?\]")
_PERCENT = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdifgeExXr%]")
_FORMAT_FIELD = re.compile(r"\{[^{}]*\}")
_WORD = re.compile(r"[A-Za-z]{2,}")


@dataclass(frozen=True)
class Site:
    """Where a message is written: a file under the package's parent folder and a line."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Message:
    """One template and where it is written; `kind` is `error`, `input` or `stderr`."""

    template: str
    kind: str
    site: Site


@dataclass(frozen=True)
class Unresolved:
    """An error whose message is not text in the source (`str(e)`, a passed-on message)."""

    site: Site
    source: str

    @property
    def key(self) -> str:
        """`path: expression`, stable when lines move."""
        return f"{self.site.path}: {self.source}"


@dataclass
class Catalogue:
    """The messages of the package, and the error sites whose text could not be read."""

    messages: list[Message] = field(default_factory=list)
    unresolved: list[Unresolved] = field(default_factory=list)

    def templates(self) -> dict[str, list[Message]]:
        """Each normalised template and the messages that give it."""
        found: dict[str, list[Message]] = {}
        for m in self.messages:
            found.setdefault(normalise(m.template), []).append(m)
        return found


def normalise(text: str) -> str:
    """A template as the command line shows it and as the page lists it: one line, library
    parameter names in backticks as the flags the user typed, `…` runs merged."""
    from .cli.output import as_flags

    text = as_flags(" ".join(text.split()))
    return re.sub(r"…(?:\s*…)+", "…", text)


def _finish(text: str) -> str:
    return re.sub(f"{_HOLE}+", "…", text)


def _has_words(text: str) -> bool:
    return bool(_WORD.search(text.replace(_HOLE, " ")))


def _product(parts: list[list[str]]) -> list[str]:
    return ["".join(p) for p in itertools.islice(itertools.product(*parts), _MAX_VARIANTS)]


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _string_constants(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level `NAME = <expression>` assignments (the expression, unrendered)."""
    found: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                found[target.id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            found[node.target.id] = node.value
    return found


_Add = Callable[[str, str, Site], None]  # (text, kind, site)


@dataclass
class _Module:
    path: str
    tree: ast.Module
    constants: dict[str, ast.expr]
    functions: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]]
    parents: dict[ast.AST, ast.AST]


class SourceReader:
    """Renders message expressions of every module of the package."""

    def __init__(self, root: Path) -> None:
        self.modules: list[_Module] = []
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            functions: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]] = {}
            parents: dict[ast.AST, ast.AST] = {}
            for node in ast.walk(tree):
                for child in ast.iter_child_nodes(node):
                    parents[child] = node
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    functions.setdefault(node.name, []).append(node)
            rel = path.relative_to(root.parent).as_posix()
            self.modules.append(_Module(rel, tree, _string_constants(tree), functions, parents))
        self.constants: dict[str, list[tuple[_Module, ast.expr]]] = {}
        self.functions: dict[str, list[tuple[_Module, ast.FunctionDef | ast.AsyncFunctionDef]]] = {}
        for m in self.modules:
            for name, value in m.constants.items():
                self.constants.setdefault(name, []).append((m, value))
            for name, defs in m.functions.items():
                self.functions.setdefault(name, []).extend((m, d) for d in defs)
        self.errors = self._error_classes()

    def _error_classes(self) -> dict[str, str]:
        """Exception class name -> kind: `ClipvizError` and its subclasses, `ImageError`."""
        kinds = {"ClipvizError": "error", "ImageError": "input"}
        grew = True
        while grew:
            grew = False
            for m in self.modules:
                for node in ast.walk(m.tree):
                    if isinstance(node, ast.ClassDef) and node.name not in kinds:
                        for base in node.bases:
                            if (name := _call_name(base)) in kinds:
                                kinds[node.name] = kinds[name]
                                grew = True
        return kinds

    # -- rendering ---------------------------------------------------------------------

    def _function_of(self, module: _Module, node: ast.AST) -> ast.AST | None:
        while node in module.parents:
            node = module.parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return node
        return None

    def _constant(self, module: _Module, name: str) -> tuple[_Module, ast.expr] | None:
        if name in module.constants:
            return module, module.constants[name]
        found = self.constants.get(name, [])
        return found[0] if len(found) == 1 else None

    def _name(self, module: _Module, node: ast.Name, env: dict[str, str], depth: int) -> list[str]:
        """A name's text: a bound argument, the assignments in its function, a constant."""
        if node.id in env:
            return [env[node.id]]
        scope = self._function_of(module, node)
        if scope is not None:
            values = [
                a.value
                for a in ast.walk(scope)
                if isinstance(a, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == node.id for t in a.targets)
            ]
            if values:
                out: list[str] = []
                for value in values:
                    out += self.render(module, value, env, depth + 1)
                return out[:_MAX_VARIANTS]
        found = self._constant(module, node.id)
        if found is not None and node.id.isupper():
            return self.render(found[0], found[1], {}, depth + 1)
        return [_HOLE]

    def _returns(
        self, call: ast.Call, depth: int
    ) -> list[tuple[_Module, ast.Return, dict[str, str]]] | None:
        """The `return`s of the package function a call names, with its constant arguments
        bound; None when the name is not one function of the package."""
        name = _call_name(call.func)
        defs = self.functions.get(name or "", [])
        if len(defs) != 1 or depth > 3:
            return None
        module, fn = defs[0]
        params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
        if params and params[0] in ("self", "cls") and isinstance(call.func, ast.Attribute):
            params = params[1:]
        env: dict[str, str] = {}
        for param, arg in zip(params, call.args, strict=False):
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                env[param] = arg.value
        for kw in call.keywords:
            if kw.arg and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                env[kw.arg] = kw.value.value
        returns = [
            (module, r, env)
            for r in ast.walk(fn)
            if isinstance(r, ast.Return)
            and r.value is not None
            and self._function_of(module, r) is fn
        ]
        return returns

    def render(
        self, module: _Module, node: ast.expr, env: dict[str, str], depth: int = 0
    ) -> list[str]:
        """The texts an expression can have, values filled in at run time as holes."""
        if depth > 6:
            return [_HOLE]
        if isinstance(node, ast.Constant):
            return [node.value] if isinstance(node.value, str) else [_HOLE]
        if isinstance(node, ast.JoinedStr):
            parts: list[list[str]] = []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    parts.append([str(value.value)])
                elif (
                    isinstance(value, ast.FormattedValue)
                    and isinstance(value.value, ast.Name)
                    and value.conversion == -1
                    and value.format_spec is None
                    and (value.value.id in env or value.value.id.isupper())
                ):
                    parts.append(self._name(module, value.value, env, depth))
                else:
                    parts.append([_HOLE])
            return _product(parts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left = self.render(module, node.left, env, depth + 1)
            right = self.render(module, node.right, env, depth + 1)
            return _product([left, right])
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            return [_PERCENT.sub(_HOLE, t) for t in self.render(module, node.left, env, depth + 1)]
        if isinstance(node, ast.IfExp):
            body = self.render(module, node.body, env, depth + 1)
            orelse = self.render(module, node.orelse, env, depth + 1)
            if orelse == [""]:
                return body
            if body == [""]:
                return orelse
            return (body + orelse)[:_MAX_VARIANTS]
        if isinstance(node, ast.Name):
            return self._name(module, node, env, depth)
        if isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "format"
                and isinstance(func.value, ast.Constant)
                and isinstance(func.value.value, str)
            ):
                return [_FORMAT_FIELD.sub(_HOLE, func.value.value)]
            returns = self._returns(node, depth)
            if returns:
                out: list[str] = []
                for m, r, bound in returns:
                    assert r.value is not None
                    out += self.render(m, r.value, bound, depth + 1)
                return out[:_MAX_VARIANTS]
        return [_HOLE]

    # -- sites -------------------------------------------------------------------------

    def _texts(self, module: _Module, node: ast.expr) -> Iterator[tuple[str, Site]]:
        """(text, site) for each text an expression can have; a call to a message-making
        function gives the sites of that function's returns."""
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Attribute) and node.func.attr == "format"
        ):
            returns = self._returns(node, 0)
            if returns:
                for m, r, env in returns:
                    assert r.value is not None
                    for text in self.render(m, r.value, env, 1):
                        yield text, Site(m.path, r.lineno)
                return
        for text in self.render(module, node, {}):
            yield text, Site(module.path, node.lineno)

    def read(self) -> Catalogue:
        """Every message of the package."""
        cat = Catalogue()
        seen: set[tuple[str, Site]] = set()

        def add(text: str, kind: str, site: Site) -> None:
            if kind == "stderr":
                text = _MARKUP.sub("", text)
            template = _finish(text).strip()
            if (template, site) not in seen:
                seen.add((template, site))
                cat.messages.append(Message(template, kind, site))

        for module in self.modules:
            for node in ast.walk(module.tree):
                if isinstance(node, ast.Call):
                    self._call(module, node, cat, add)
                elif isinstance(node, ast.Dict):
                    for key, value in zip(node.keys, node.values, strict=True):
                        if isinstance(key, ast.Constant) and key.value == "error":
                            self._reason(module, value, add)
                elif isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Attribute) and target.attr == "error":
                            self._reason(module, node.value, add)
        return cat

    def _reason(self, module: _Module, node: ast.expr, add: _Add) -> None:
        for text, site in self._texts(module, node):
            if _has_words(text):
                add(text, "input", site)

    def _call(self, module: _Module, node: ast.Call, cat: Catalogue, add: _Add) -> None:
        name = _call_name(node.func)
        message: ast.expr | None = node.args[0] if node.args else None
        if name in self.errors:
            for kw in node.keywords:
                if kw.arg == "message":
                    message = kw.value
            if message is None:
                return
            texts = list(self._texts(module, message))
            if not any(_has_words(text) for text, _ in texts):
                site = Site(module.path, node.lineno)
                cat.unresolved.append(Unresolved(site, ast.unparse(message)))
                return
            for text, site in texts:
                if _has_words(text):
                    add(text, self.errors[name], site)
            return
        is_stderr = (
            name == "print"
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "err_console"
        )
        if (is_stderr or name == "warn") and message is not None:
            for text, site in self._texts(module, message):
                if _has_words(text):
                    add(text, "stderr", site)
        for kw in node.keywords:
            if kw.arg == "error":
                self._reason(module, kw.value, add)
