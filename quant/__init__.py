"""lmforge quantization: GPTQ, int8 and NF4 (see issue 5)."""
