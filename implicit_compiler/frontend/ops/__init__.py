"""One module per op family; importing this package registers every lowering."""

from . import activation, conv, elementwise, linear, normalization, pooling, recurrent, shape, softmax  # noqa: F401
