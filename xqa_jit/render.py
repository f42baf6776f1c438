"""Stage 1: spec -> CUDA source text (pure; no I/O beyond reading the templates)."""
from __future__ import annotations

import functools
from pathlib import Path


def template_dir() -> Path:
    """The templates directory: inside the installed package, or ../templates in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "templates", here.parent / "templates"):
        if (cand / "decode.cu.jinja").is_file():
            return cand
    raise FileNotFoundError(f"xqa_jit templates not found next to {here}")


@functools.lru_cache(maxsize=None)
def _env():
    import jinja2  # imported lazily: `import xqa_jit` stays cheap

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


@functools.lru_cache(maxsize=256)
def render(spec) -> str:
    """The complete, self-contained CUDA translation unit for ``spec``."""
    return _env().get_template(spec.template).render(**spec.template_args())
