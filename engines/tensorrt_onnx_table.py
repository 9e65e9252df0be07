"""TensorRT 10.x's ONNX parser: its published operator support table, as data.

Source: onnx/onnx-tensorrt, ``docs/operators.md``, the edition that opens "TensorRT 10.15 supports
operators in the inclusive range of opset 9 to opset 24" (the newest 10.x edition available to this
work; the 10.1 GA edition, commit 96e7811, lists the same operators for everything posterrt emits,
with stricter wording for Pad/Squeeze/Unsqueeze axes). Types are the table's names (FP32 = ONNX
FLOAT, ...). posterrt's checks of these facts live in ``engines/onnx_operators.py``.
"""
from __future__ import annotations

TABLE_SOURCE = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15 edition)"
TABLE_TENSORRT = "10.15"
OPSET_RANGE = (9, 24)

_FLOAT = "FP32, FP16, BF16"
_NUMERIC = "FP32, FP16, BF16, INT32, INT64"
_ANY = "FP32, FP16, BF16, INT32, INT64, BOOL"


def _rows(types: str, operators: str) -> dict:
    return {op: tuple(t.strip() for t in types.split(",")) for op in operators.split()}


#: Operators the parser imports ("Supported: Y"), with their supported types.
SUPPORTED = {
    **_rows(_NUMERIC, """Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual
        Max Min Mod Mul Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
        ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign
        SpaceToDepth Sub Sum TopK"""),
    **_rows(_FLOAT, """Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv
        ConvTranspose Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool
        GlobalMaxPool GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf
        LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool
        MeanVarianceNormalization ParametricSoftplus PRelu QuantizeLinear RandomNormal RandomNormalLike
        RandomUniform RandomUniformLike Reciprocal Resize RMSNormalization RNN RotaryEmbedding Round ScaledTanh
        Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample"""),
    **_rows(_ANY, """Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape
        ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where"""),
    **_rows("FP32, FP16, BF16, INT32, INT64, UINT8, BOOL", "Cast CastLike"),
    **_rows("FP32, FP16", """BlackmanWindow DeformConv GridSample HammingWindow HannWindow Mish NonMaxSuppression
        NonZero RoiAlign"""),
    **_rows("FP32, FP16, BF16, FP8, FP4, INT4, INT32, INT64, BOOL", "Constant ConstantOfShape"),
    **_rows("BOOL", "And Not Or Xor"),
    **_rows("FP32, FP16, BF16, INT8, FP8", "Attention"),
    **_rows("FP32, FP16, BF16, INT8, INT32, INT64", "Gelu"),
    **_rows("FP32, FP16, BF16, FP8, INT32, INT64", "Mean"),
    **_rows("INT8, FP8, FP4, INT4", "DequantizeLinear"),
    **_rows("FP32", "STFT"),
    **_rows("FP32, FP16, BF16, INT32", "TensorScatter"),
}

#: Operators the table lists as not supported ("Supported: N").
NOT_SUPPORTED = frozenset("""AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im
    CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger
    MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
    OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat
    StringNormalizer StringSplit TfIdfVectorizer Unique""".split())

_REDUCE_AXES = "`axes` must be an initializer"

#: The table's "Restrictions" column, verbatim in substance.
RESTRICTIONS = {
    "Attention": "`Q`, `K`, `V` and `attn_mask` must be 4D; `past_key`, `past_value`, `nonpad_kv_seqlen` inputs, "
                 "`present_key`, `present_value`, `qk_matmul_output` outputs, `qk_matmul_output_mode` and `softcap` "
                 "are unsupported",
    "AveragePool": "2D or 3D pooling only. `dilations` must be empty or all ones",
    "Constant": "`sparse_value`, `value_string`, and `value_strings` attributes are unsupported",
    "CumSum": "`axis` must be a build-time constant",
    "DeformConv": "`input` must have 1D or 2D spatial dimensions; begin and end `pads` must be equal per axis",
    "DequantizeLinear": "`x_zero_point` must be zero",
    "Dropout": "`is_training` must be an initializer and evaluate to False",
    "EyeLike": "`input` must have static dimensions",
    "GridSample": "input must be 4D",
    "GRU": "for bidirectional GRUs, activation functions must be the same for both directions",
    "Hardmax": "`axis` dimension of input must be a build-time constant",
    "If": "output tensors of the two branches must have the same rank and different names",
    "LayerNormalization": "only the first output `Y` is supported",
    "Loop": "scan output length cannot be dynamic; loop-carried shapes must not change across iterations",
    "LpPool": "`dilations` must be empty or all ones",
    "LSTM": "same activations both directions; `input_forget` must be 0; `layout` must be 0",
    "MaxPool": "2D or 3D pooling only. `Indices` output tensor unsupported. `dilations` must be empty or all ones",
    "OneHot": "`depth` must be a build-time constant",
    "QuantizeLinear": "`y_zero_point` must be 0",
    "RandomNormal": "`seed` is ignored", "RandomNormalLike": "`seed` is ignored",
    "RandomUniform": "`seed` is ignored", "RandomUniformLike": "`seed` is ignored",
    **{op: _REDUCE_AXES for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                                   "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "Resize": "transformation modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, align_corners; "
              "modes nearest, linear; nearest modes floor, ceil, round_prefer_floor, round_prefer_ceil; aspect ratio "
              "policy stretch; tensor `scales` need iota `axes`; no antialiasing",
    "RNN": "for bidirectional RNNs, activation functions must be the same for both directions",
    "RotaryEmbedding": "`position_ids` must be INT64",
    "ScatterND": "`reduction` other than `none` is not supported",
    "Squeeze": "`axes` must be resolvable to a constant",
    "STFT": "`frame_step` and `window` must be initializers; input must be real-valued",
    "TensorScatter": "`past_cache` and `update` must be 4D; `axis` must be -2",
    "TopK": "`sorted` must be 1. `K` input must be less than 3840",
    "Unsqueeze": "`axes` must be resolvable to a constant",
}

#: The table's note: UINT8 is supported only as a network input or output type.
IO_ONLY_TYPES = ("UINT8",)
#: Types the parser accepts on graph inputs and outputs (DOUBLE is cast down to FLOAT, clamped).
IO_TYPES = ("FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL")
