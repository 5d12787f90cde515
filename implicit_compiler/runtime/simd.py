"""Explicit SIMD vectors for numba kernels: 64-byte LLVM vectors held in registers.

numba vectorizes simple loops by itself, but it cannot keep a block of accumulators in
registers across a loop: an accumulator array is memory it cannot prove distinct from the
arrays read, so every update is a load and a store. These intrinsics give kernels a value type
``Vector`` (``<16 x float>`` for float32, ``<8 x double>`` for float64: one AVX-512 register) that
lives in SSA registers like a scalar:

    acc = vsplat(values, bias)                # every lane = bias
    acc = vfma(acc, vload(values, row, j), w)  # acc += values[row, j : j + lanes] * w
    vstore(values, row, j, acc)

``vlanes(values)`` is the lane count for the array's dtype, a compile-time constant;
``vload_first`` / ``vstore_first`` touch only the first ``count`` lanes (masked: nothing past
them is read or written), for the end of a row. ``vprefetch`` asks the cache for a line soon;
``vrelu`` is max(vector, 0); ``vtranspose_tile`` transposes a square tile (``TILE_BYTES``).
Arrays are 2-d with contiguous rows (C order, or column slices of it), or contiguous 1-d arrays,
where (row, column) addresses array[row + column]. Loads and stores are
unaligned and unchecked: callers keep column + lanes <= values.shape[1]. On machines without
64-byte vectors LLVM splits them into narrower ones (two AVX registers); the results are the
same. Intrinsics are named the opaque-pointer way (``llvm.masked.load.v16f32.p0``): numba
0.68's llvmlite (LLVM 22) and later.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

# AVX-512 registers: against 32 bytes, LeNet-5's convolutions went from 65-73 to 79-96 GMAC/s at
# batch 256 and ResNet20 at batch 256 from 256-284 to 216-219 ms (AMD Zen 4: the same
# multiply-adds per cycle, half the instructions, and per loaded input twice the lanes).
VECTOR_BYTES = 64
# vtranspose_tile's tiles: 8 x 8 float32 (16 x 16 took twice as long: 110 against 55 us for
# LeNet-5's batch of 256).
TILE_BYTES = 32
_I32 = ir.IntType(32)


class Vector(types.Type):
    """A register of ``VECTOR_BYTES`` of one float dtype."""

    def __init__(self, dtype: types.Float):
        self.dtype = dtype
        self.lanes = VECTOR_BYTES // (dtype.bitwidth // 8)
        super().__init__(name=f"Vector({dtype}x{self.lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type: Vector):
        element = ir.FloatType() if fe_type.dtype == types.float32 else ir.DoubleType()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


def _i32(value: int) -> ir.Constant:
    return ir.Constant(_I32, value)


def _broadcast(builder, vector_type, scalar):
    """A vector with every lane equal to scalar."""
    first = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar, _i32(0))
    zeros = ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(first, ir.Constant(vector_type, ir.Undefined), zeros)


def _address(context, builder, signature, args, vector_type):
    """Pointer to array[row, column] (args = array, row, column, ...) as a vector pointer; for a
    1-d array, to array[row + column]."""
    array_type, array = signature.args[0], args[0]
    row, column = (context.cast(builder, a, t, types.intp) for a, t in zip(args[1:3], signature.args[1:3]))
    data = context.make_array(array_type)(context, builder, array)
    item = context.get_constant(types.intp, array_type.dtype.bitwidth // 8)
    if array_type.ndim == 1:
        offset = builder.mul(builder.add(row, column), item)
    else:
        row_stride = cgutils.unpack_tuple(builder, data.strides, 2)[0]
        offset = builder.add(builder.mul(row, row_stride), builder.mul(column, item))
    address = builder.add(builder.ptrtoint(data.data, ir.IntType(64)), offset)
    return builder.inttoptr(address, vector_type.as_pointer())


def _first_lanes(context, builder, count, count_type, lanes):
    """The mask <lanes x i1> with lane k on when k < count."""
    count_ = _broadcast(builder, ir.VectorType(_I32, lanes), context.cast(builder, count, count_type, types.int32))
    return builder.icmp_signed("<", ir.Constant(ir.VectorType(_I32, lanes), list(range(lanes))), count_)


def _declare(builder, name, return_type, argument_types):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, argument_types), name)


def _suffix(vector: Vector) -> str:
    return f"v{vector.lanes}f{vector.dtype.bitwidth}"


@intrinsic
def vlanes(typingctx, array):
    """The lane count of a vector of the array's dtype (a constant)."""
    lanes = Vector(array.dtype).lanes

    def codegen(context, builder, signature, args):
        return context.get_constant(types.intp, lanes)

    return types.intp(array), codegen


@intrinsic
def vsplat(typingctx, array, value):
    """A vector of the array's dtype with every lane equal to value."""
    vector = Vector(array.dtype)

    def codegen(context, builder, signature, args):
        scalar = context.cast(builder, args[1], signature.args[1], vector.dtype)
        return _broadcast(builder, context.get_value_type(vector), scalar)

    return vector(array, value), codegen


@intrinsic
def vload(typingctx, array, row, column):
    """array[row, column : column + lanes] as a vector."""
    vector = Vector(array.dtype)

    def codegen(context, builder, signature, args):
        return builder.load(_address(context, builder, signature, args, context.get_value_type(vector)), align=1)

    return vector(array, row, column), codegen


@intrinsic
def vstore(typingctx, array, row, column, value):
    """array[row, column : column + lanes] = value."""

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(signature.args[3])
        builder.store(args[3], _address(context, builder, signature, args, vector_type), align=1)
        return context.get_dummy_value()

    return types.none(array, row, column, value), codegen


@intrinsic
def vload_first(typingctx, array, row, column, count):
    """array[row, column : column + count] in the first count lanes, 0 in the others; nothing
    past them is read."""
    vector = Vector(array.dtype)

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(vector)
        mask = _first_lanes(context, builder, args[3], signature.args[3], vector.lanes)
        pointer = _address(context, builder, signature, args, vector_type)
        load = _declare(
            builder, f"llvm.masked.load.{_suffix(vector)}.p0", vector_type,
            [vector_type.as_pointer(), _I32, mask.type, vector_type],
        )  # fmt: skip
        return builder.call(load, [pointer, _i32(1), mask, ir.Constant(vector_type, [0.0] * vector.lanes)])

    return vector(array, row, column, count), codegen


@intrinsic
def vstore_first(typingctx, array, row, column, value, count):
    """array[row, column : column + count] = the first count lanes of value; nothing past them
    is written."""

    def codegen(context, builder, signature, args):
        vector = signature.args[3]
        vector_type = context.get_value_type(vector)
        mask = _first_lanes(context, builder, args[4], signature.args[4], vector.lanes)
        pointer = _address(context, builder, signature, args, vector_type)
        store = _declare(
            builder, f"llvm.masked.store.{_suffix(vector)}.p0", ir.VoidType(),
            [vector_type, vector_type.as_pointer(), _I32, mask.type],
        )  # fmt: skip
        builder.call(store, [args[3], pointer, _i32(1), mask])
        return context.get_dummy_value()

    return types.none(array, row, column, value, count), codegen


@intrinsic
def vfma(typingctx, accumulator, vector, weight):
    """accumulator + vector * weight (weight a scalar, broadcast, or a vector), fused where the
    CPU can."""

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(signature.args[0])
        if isinstance(signature.args[2], Vector):
            factor = args[2]
        else:
            scalar = context.cast(builder, args[2], signature.args[2], signature.args[0].dtype)
            factor = _broadcast(builder, vector_type, scalar)
        fmuladd = _declare(builder, f"llvm.fmuladd.{_suffix(signature.args[0])}", vector_type, [vector_type] * 3)
        return builder.call(fmuladd, [args[1], factor, args[0]])

    return accumulator(accumulator, vector, weight), codegen


@intrinsic
def vgather(typingctx, array, indices, position):
    """array[indices[position + k]] in lane k: a 1-d float array gathered through a 1-d uint32
    index array (unchecked, as the loads)."""
    vector = Vector(array.dtype)

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(vector)
        index_type = ir.VectorType(_I32, vector.lanes)
        index_signature = types.none(signature.args[1], types.intp, signature.args[2])
        zero = context.get_constant(types.intp, 0)
        at = [args[1], zero, args[2]]
        offsets = builder.load(_address(context, builder, index_signature, at, index_type), align=1)
        data = context.make_array(signature.args[0])(context, builder, args[0])
        element = vector_type.element
        wide = ir.VectorType(ir.IntType(64), vector.lanes)
        item = ir.Constant(wide, [context.get_abi_sizeof(element)] * vector.lanes)
        start = _broadcast(builder, wide, builder.ptrtoint(data.data, ir.IntType(64)))
        addresses = builder.add(start, builder.mul(builder.zext(offsets, wide), item))
        pointers = builder.inttoptr(addresses, ir.VectorType(element.as_pointer(), vector.lanes))
        mask = ir.Constant(ir.VectorType(ir.IntType(1), vector.lanes), [1] * vector.lanes)
        gather = _declare(
            builder, f"llvm.masked.gather.{_suffix(vector)}.v{vector.lanes}p0", vector_type,
            [pointers.type, _I32, mask.type, vector_type],
        )  # fmt: skip
        alignment = _i32(context.get_abi_sizeof(element))
        return builder.call(gather, [pointers, alignment, mask, ir.Constant(vector_type, ir.Undefined)])

    return vector(array, indices, position), codegen


@intrinsic
def vprefetch(typingctx, array, row, column):
    """Ask the cache for the line holding array[row, column] (a hint: never faults, even past
    the end of the array)."""

    def codegen(context, builder, signature, args):
        pointer = _address(context, builder, signature, args, ir.IntType(8))
        prefetch = _declare(builder, "llvm.prefetch.p0", ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32])
        builder.call(prefetch, [pointer, _i32(0), _i32(3), _i32(1)])  # read, keep in all levels, data
        return context.get_dummy_value()

    return types.none(array, row, column), codegen


@intrinsic
def vrelu(typingctx, vector):
    """max(vector, 0) lane by lane (a NaN lane gives 0, as ``x if x > 0 else 0``)."""

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(signature.args[0])
        zero = ir.Constant(vector_type, [0.0] * vector_type.count)
        return builder.select(builder.fcmp_ordered(">", args[0], zero), args[0], zero)

    return vector(vector), codegen


@intrinsic
def vtranspose_tile(typingctx, source, target, row, column):
    """target[column + a, row + b] = source[row + b, column + a] for a, b < lanes, lanes =
    TILE_BYTES / itemsize: a square tile read as lanes vectors, transposed in registers, written
    as lanes vectors. Returns the sum of 0 x value over the tile: 0, or NaN when a value is
    NaN or infinite."""
    lanes = TILE_BYTES // (source.dtype.bitwidth // 8)
    element = ir.FloatType() if source.dtype == types.float32 else ir.DoubleType()

    def codegen(context, builder, signature, args):
        vector_type = ir.VectorType(element, lanes)
        intp = context.get_value_type(types.intp)
        row, column = (context.cast(builder, a, t, types.intp) for a, t in zip(args[2:4], signature.args[2:4]))
        source_signature = types.none(signature.args[0], types.intp, types.intp)
        target_signature = types.none(signature.args[1], types.intp, types.intp)
        loaded = []
        for b in range(lanes):
            at = [args[0], builder.add(row, ir.Constant(intp, b)), column]
            loaded.append(builder.load(_address(context, builder, source_signature, at, vector_type), align=1))
        zero = ir.Constant(vector_type, [0.0] * lanes)
        check = zero  # 0 x value summed: NaN from any NaN or infinite value
        for vector in loaded:
            check = builder.fadd(check, builder.fmul(vector, zero))
        name = f"llvm.vector.reduce.fadd.v{lanes}f{source.dtype.bitwidth}"
        checked = builder.call(
            _declare(builder, name, element, [element, vector_type]), [ir.Constant(element, 0.0), check]
        )
        # one wide vector holding the tile row by row, then every lane picked in column order
        while len(loaded) > 1:
            width = loaded[0].type.count
            joined = []
            for k in range(0, len(loaded), 2):
                mask = ir.Constant(ir.VectorType(_I32, 2 * width), list(range(2 * width)))
                joined.append(builder.shuffle_vector(loaded[k], loaded[k + 1], mask))
            loaded = joined
        tile = loaded[0]
        for a in range(lanes):
            mask = ir.Constant(ir.VectorType(_I32, lanes), [b * lanes + a for b in range(lanes)])
            column_vector = builder.shuffle_vector(tile, ir.Constant(tile.type, ir.Undefined), mask)
            at = [args[1], builder.add(column, ir.Constant(intp, a)), row]
            builder.store(column_vector, _address(context, builder, target_signature, at, vector_type), align=1)
        return checked

    return source.dtype(source, target, row, column), codegen
