"""One module per op family; importing this package registers every lowering."""

from . import (  # noqa: F401
    activation,
    bilinear,
    conv,
    elementwise,
    fixed_point,
    linear,
    lrn,
    normalization,
    pooling,
    recurrent,
    resize,
    select,
    shape,
    softmax,
    standardize,
)
