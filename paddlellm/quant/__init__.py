"""Quantization engines: PTQ/GPTQ methods (methods), the calibrate-quantize-save pipeline (pipeline) and its
acceptance report (report). The command is paddlellm.commands.quant; the int8/int4 folder format is
paddlellm.formats.quantized."""
