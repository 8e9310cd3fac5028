"""Model-folder formats other than paddlenlp's own: transformers folders (hf), real int8/int4 checkpoints
(quantized) and static-graph exports (static). Codecs parametrised by a family object; they import only
the foundations, so the family registry can use them to read any float checkpoint."""
