"""ONNX export (`selfhost export onnx`) and the ONNX Runtime runner behind `LLM(DIR)` for an exported folder.

export.py writes the folder (decoder_graph.py builds the graph, block_quant.py the
int4/int8 weights, layout.py the names ONNX Runtime GenAI reads); decoder.py runs
it one sequence at a time and engine.py puts it behind LLM / SamplingParams.
"""
