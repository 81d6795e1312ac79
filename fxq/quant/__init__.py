"""The quantization steps after the graph passes: the arithmetic (quantizer.py, the only place a scale is derived),
the op catalogue, observers, freeze, and the optional weight rounding (AdaRound/BRECQ) and bias correction."""
