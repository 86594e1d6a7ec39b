"""The deployment tool's output folders follow the project's one ownership rule, which lives in
`softpatch_jax/outdir.py` (the demo generators in data/ write folders too, and data/ may not import
deploy/); this name is kept so `from softpatch_jax.deploy import outdir` still reads the same module."""

from softpatch_jax.outdir import (  # noqa: F401
    OWNED,
    OutputFolderError,
    apply_umask,
    check_outside,
    check_target,
    clean_leftovers,
    first_foreign,
    lock,
    read_owned,
    staged,
    umask,
    write_owned,
)
