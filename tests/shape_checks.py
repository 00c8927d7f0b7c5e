"""The type checker the test suite runs jstream under (``--jaxtyping-packages`` in ``pyproject.toml``).

jaxtyping's import hook decorates every function and dataclass of ``jstream`` and ``pallas_kernels`` with
``jaxtyped(typechecker=check)``: array shapes in annotations (``Float[Array, "b t n h"]``, names from
``jstream/typing.py``) must agree within each call, and other annotations are checked by beartype. PEP 484's
numeric tower is on: an ``int`` is accepted where a ``float`` is annotated.
"""

from beartype import BeartypeConf, beartype

check = beartype(conf=BeartypeConf(is_pep484_tower=True))
