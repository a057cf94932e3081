"""Op tables and tolerances shared by the channel analysis, the passes and the exporter (one definition each).

Tables that look alike but differ are kept apart under distinct names, because merging them would change
what some pass recognises (e.g. HRF's FFN matcher knows fewer activations than the channel analysis).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------- tolerances

EQUIVALENCE_TOLERANCE = 1e-5  # relative error a pass's output may have against its input (folds, prune mask)
EXPORT_TOLERANCE = 1e-4  # ONNX export parity: max |ORT - torch| / max(1, max |torch|)

# ------------------------------------------------------------------------------------------- layer types

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
POOL_DIMS = {  # pooling module type -> number of trailing (spatial) dims it pools over
    nn.AvgPool1d: 1, nn.MaxPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
    nn.AvgPool2d: 2, nn.MaxPool2d: 2, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2,
    nn.AvgPool3d: 3, nn.MaxPool3d: 3, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool3d: 3,
}

# ------------------------------------------------------------------------------------------- FFN activations
# What HRF's FFN matcher accepts between an FFN's two linears (isinstance for modules).

FFN_ACTIVATION_MODULES = (nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU,
                          nn.SELU, nn.CELU, nn.Hardswish, nn.Softplus)
FFN_ACTIVATION_FUNCTIONS = {F.gelu, F.relu, F.relu6, F.silu, F.mish, F.leaky_relu, F.elu, F.selu, F.celu,
                            F.hardswish, F.softplus, F.tanh, F.sigmoid, torch.relu, torch.tanh, torch.sigmoid,
                            torch.selu, torch.celu}
FFN_ACTIVATION_METHODS = {"relu", "gelu", "silu", "mish", "tanh", "sigmoid"}
FFN_DROPOUT_MODULES = (nn.Dropout, nn.AlphaDropout, nn.Identity)  # skipped by the FFN matcher
FFN_DROPOUT_FUNCTIONS = {F.dropout}
FFN_MUL_FUNCTIONS = {operator.mul, torch.mul}  # a gated FFN's product (no in-place or alias spellings)

# ------------------------------------------------------------------------------------------- elementwise ops
# Every spelling the channel analysis follows. Unary tables map the op to whether it maps 0 to 0 (exact
# module types, not subclasses).

UNARY_MODULES = {
    nn.ReLU: True, nn.ReLU6: True, nn.GELU: True, nn.SiLU: True, nn.Mish: True, nn.Tanh: True, nn.LeakyReLU: True,
    nn.ELU: True, nn.SELU: True, nn.CELU: True, nn.Hardswish: True, nn.Hardtanh: True, nn.Softsign: True,
    nn.Tanhshrink: True, nn.Softshrink: True, nn.Hardshrink: True,
    nn.Dropout: True, nn.Dropout1d: True, nn.Dropout2d: True, nn.Dropout3d: True, nn.AlphaDropout: True,
    nn.FeatureAlphaDropout: True, nn.Identity: True,
    nn.Sigmoid: False, nn.Softplus: False, nn.Hardsigmoid: False, nn.LogSigmoid: False,
}
UNARY_FUNCTIONS = {
    F.relu: True, F.relu6: True, F.gelu: True, F.silu: True, F.mish: True, F.leaky_relu: True, F.elu: True,
    F.selu: True, F.celu: True, F.hardswish: True, F.hardtanh: True, F.softsign: True, F.tanh: True,
    F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True, F.alpha_dropout: True,
    torch.relu: True, torch.tanh: True, torch.selu: True, torch.celu: True, torch.neg: True, operator.neg: True,
    torch.abs: True, operator.abs: True, torch.sin: True, torch.sqrt: True, torch.square: True, torch.erf: True,
    torch.clone: True, torch.detach: True,
    F.sigmoid: False, torch.sigmoid: False, torch.exp: False, torch.cos: False, F.softplus: False,
    F.hardsigmoid: False, F.logsigmoid: False,
}
UNARY_METHODS = {
    "relu": True, "relu_": True, "tanh": True, "tanh_": True, "neg": True, "abs": True, "sin": True, "sqrt": True,
    "square": True, "erf": True, "contiguous": True, "clone": True, "detach": True, "float": True, "to": True,
    "type_as": True, "double": True, "half": True, "bfloat16": True, "requires_grad_": True,
    "sigmoid": False, "sigmoid_": False, "exp": False, "cos": False,
}
LIKE_FUNCTIONS = {torch.zeros_like: True, torch.ones_like: False, torch.empty_like: False, torch.full_like: False,
                  torch.rand_like: False, torch.randn_like: False}  # value: the result is all zeros

ADD_FUNCTIONS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, torch.subtract}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, torch.multiply}
DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
ADD_METHODS = {"add", "add_", "sub", "sub_"}
MUL_METHODS = {"mul", "mul_"}
DIV_METHODS = {"div", "div_"}

# ------------------------------------------------------------------------------------------- other ops

REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var}
REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var"}
SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax}
SOFTMAX_METHODS = {"softmax", "log_softmax"}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
