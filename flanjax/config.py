"""gin, t5x style: files and `--gin.KEY=VALUE` bindings, and a check that every binding is read.

gin accepts a macro that nothing refers to (`TRAIN_STEPZ = 5` next to `TRAIN_STEPS`) and a
binding of a configurable that the run never builds, silently. `check_bindings` walks what the
run reads, from its entry point through every `@reference` and `%MACRO`, and refuses the rest
before anything is built.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable

import gin
from gin import config as gin_config

from flanjax import paths
from flanjax.errors import FlanjaxError

# gin reads local files itself; gs:// and other remote ones (included files too) through tf.io.gfile.
gin_config.register_file_reader(paths.open, lambda path: paths.is_remote(path) and paths.exists(path))
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Macros the command line reads itself (gin.query_parameter), not through a binding.
CLI_MACROS = ("MODEL_DIR", "TRAINER")


class ConfigError(FlanjaxError, ValueError):
    pass


_FILES_CONFIG: dict = {}  # gin's config as the files left it, before the command line's bindings


_LITERAL = re.compile(r"""^(['"@%\[({]|-?\d|True$|False$|None$)""")


def gin_binding(key: str, value: str) -> str:
    """`--gin.KEY=VALUE` -> a gin binding; a bare path or word becomes a string."""
    return f"{key} = {value if _LITERAL.match(value) else repr(value)}"


def parse_gin(files: list[str], bindings: list[str]) -> None:
    """Parses gin files (found here or in the repository) and then the bindings."""
    import flanjax.data.vocab  # noqa: F401  registers vocab.default_tokenizer, which every run file may bind

    gin.add_config_file_search_path(os.getcwd())
    gin.add_config_file_search_path(REPO_ROOT)
    missing = [f for f in files if not paths.exists(f) and not os.path.exists(os.path.join(REPO_ROOT, f))]
    if missing:
        raise ConfigError(f"gin file {missing[0]!r} not found (looked in {os.getcwd()} and {REPO_ROOT}).")
    resolved = [f if paths.exists(f) else os.path.join(REPO_ROOT, f) for f in files]
    global _FILES_CONFIG
    try:
        gin.parse_config_files_and_bindings(resolved, None, finalize_config=False)
        _FILES_CONFIG = {key: dict(params) for key, params in gin_config._CONFIG.items()}
        gin.parse_config(bindings)
        gin.finalize()
    except (ValueError, KeyError, TypeError, SyntaxError, ImportError) as e:
        raise ConfigError(f"gin configuration error: {e}") from None


def _references(value) -> Iterable[tuple[str, str]]:
    """The config keys (scope, selector) that a bound value refers to, nested ones included."""
    if isinstance(value, gin_config.ConfigurableReference):
        yield value.config_key
        if value.scopes:  # a scoped call also reads the unscoped bindings
            yield "", value.configurable.selector
    elif isinstance(value, dict):
        for item in value.items():
            yield from _references(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _references(item)


def _is_static(selector: str) -> bool:
    """Registered in Python with @gin.configurable: code may call it directly, so its bindings
    count as read. (Dynamically registered ones, `from x import y` in a gin file, are called
    only through references.)"""
    configurable = gin_config._REGISTRY.get_match(selector)
    return configurable is not None and configurable.import_source is None and configurable.module != "gin"


def unread_bindings(entry: str, config: dict | None = None) -> list[tuple[str, str]]:
    """Config keys (scope, selector) bound in `config` (gin's) but not reachable from `entry` (a
    configurable's complete selector, e.g. "flanjax.train.lm.train") or from what code reads
    directly."""
    config = gin_config._CONFIG if config is None else config
    reached = {("", entry)} | {(name, "gin.macro") for name in CLI_MACROS}
    reached |= {key for key in config if _is_static(key[1])}
    todo = [key for key in reached if key in config]
    while todo:
        for ref in _references(list(config[todo.pop()].values())):
            if ref not in reached:
                reached.add(ref)
                if ref in config:
                    todo.append(ref)
    return [key for key in config if key not in reached]


def _short(selector: str) -> str:
    return ".".join(selector.split(".")[-2:])


def check_bindings(entry: str) -> None:
    """Refuses bindings that nothing in the run reads, naming the nearest names that are read.

    A command-line binding may override one that referred to a macro (`--gin.LoopConfig.num_steps=9`
    leaves TRAIN_STEPS unread): that is no mistake, so the files are checked as they stand alone
    and the command line's bindings in the final config."""
    final = gin_config._CONFIG
    from_command_line = {key for key, params in final.items() if params != _FILES_CONFIG.get(key)}
    in_files = set(unread_bindings(entry, _FILES_CONFIG))
    unread = [key for key in unread_bindings(entry) if key in from_command_line or key in in_files]
    if not unread:
        return
    macros = {scope for scope, selector in gin_config._CONFIG if selector == "gin.macro"}
    lines = []
    for scope, selector in unread:
        if selector == "gin.macro":
            near = difflib.get_close_matches(scope, sorted(macros - {scope}), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(near)}?" if near else "."
            lines.append(f"  {scope}: a macro that no binding refers to (as %{scope}){hint}")
        else:
            name = f"{scope}/{_short(selector)}" if scope else _short(selector)
            params = ", ".join(sorted(gin_config._CONFIG[scope, selector]))
            lines.append(f"  {name} ({params}): this run never builds it; nothing refers to @{name}().")
    raise ConfigError(
        "gin bindings that nothing in this run reads (a misspelt name, or a setting for another run file):\n"
        + "\n".join(lines) + "\nFix the name or remove the binding; nothing has been built yet."
    )
