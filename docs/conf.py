"""
Sphinx configuration for the modelslab-async documentation.

``nox -s docs`` builds it with ``-W``: every warning is an error. Nothing
here fetches anything at build time (no intersphinx): CI has no network
besides the package registries.
"""

from __future__ import annotations

from importlib.metadata import version as distribution_version
from typing import TYPE_CHECKING, Any

from docutils import nodes


if TYPE_CHECKING:
    from sphinx.application import Sphinx


# -- Project -----------------------------------------------------------------

project = "modelslab-async"
author = "The modelslab-async team"
copyright = f"%Y, {author}"
release = distribution_version("modelslab-async")
version = ".".join(release.split(".")[:2])


# -- General -----------------------------------------------------------------

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]

root_doc = "index"
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
# Links like [](jobs.md#the-deadline) reach headings down to ###.
myst_heading_anchors = 3

# Resolved references show `JobHandle`, not `modelslab_async.JobHandle`.
python_use_unqualified_type_names = True


# -- autodoc and napoleon ----------------------------------------------------

autodoc_typehints = "description"
autodoc_member_order = "bysource"
# Show these type aliases by name rather than expanded: EnhanceStyle is a
# Literal of 188 strings, FaultKind one of 11. Each links to its entry.
autodoc_type_aliases = {
    "EnhanceStyle": "modelslab_async._vocabulary.EnhanceStyle",
    "Scheduler": "modelslab_async._vocabulary.Scheduler",
    "FaultKind": "modelslab_async.emulator.FaultKind",
}

napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Sphinx 9.0 shows such an alias by name when it stands alone, but by its
# repr, "TypeAliasForwardRef('...')", inside a union ("EnhanceStyle | None")
# or a generic. Make the repr the name. Should a later Sphinx move the
# class, the build still works; only those unions look worse again.
try:
    from sphinx.util.inspect import TypeAliasForwardRef
except ImportError:
    pass
else:
    TypeAliasForwardRef.__repr__ = lambda self: self.name


# -- HTML --------------------------------------------------------------------

html_theme = "furo"
html_title = f"modelslab-async {release}"

# Copy the command or the code, not the prompt.
copybutton_prompt_text = r"\$ |>>> |\.\.\. "
copybutton_prompt_is_regexp = True


# -- Hooks -------------------------------------------------------------------
# Unused parameters start with "_": Sphinx calls each hook with its event's
# full argument list.


def _public_bases(
    _app: Sphinx, _name: str, _obj: object, _options: object, bases: list[type]
) -> None:
    """
    Show a private base class (``_LocatedError``) as its own bases, so
    the reference never names a class users cannot import.
    """
    index = 0
    while index < len(bases):
        base = bases[index]
        if base.__name__.startswith("_"):
            bases[index : index + 1] = [
                b for b in base.__bases__ if b not in bases
            ]
        else:
            index += 1


def _factory_defaults(
    _app: Sphinx, *event: Any
) -> tuple[str, str | None] | None:
    """
    Show a default made by an attrs factory as ``<factory>``, the way
    dataclasses do, rather than attrs' internal ``NOTHING``.
    """
    # autodoc-process-signature: what, name, obj, options, signature,
    # return_annotation.
    *_, signature, return_annotation = event
    if signature and "=NOTHING" in signature:
        return signature.replace("=NOTHING", "=<factory>"), return_annotation
    return None


def _no_none_rtype_on_exceptions(
    _app: Sphinx, domain: str, objtype: str, contentnode: nodes.Element
) -> None:
    """
    Drop "Return type: None" from exception classes.

    autodoc leaves it out for a ``class`` but not for an ``exception``,
    whose ``__init__`` is annotated ``-> None`` like any other.
    """
    if domain != "py" or objtype != "exception":
        return
    for field in list(contentnode.findall(nodes.field)):
        name, body = field[0].astext(), field[1].astext()
        if name in {"rtype", "Return type"} and body == "None":
            field_list = field.parent
            field_list.remove(field)
            if not field_list.children:
                field_list.parent.remove(field_list)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-process-signature", _factory_defaults)
    # After autodoc's own handler (priority 500) has added the field.
    app.connect(
        "object-description-transform",
        _no_none_rtype_on_exceptions,
        priority=600,
    )
    return {"parallel_read_safe": True, "parallel_write_safe": True}
