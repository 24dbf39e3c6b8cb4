"""Tool calling: tool definitions, each model family's tool-call format, and parsing the model's calls.

calls.py     ToolSpec / ToolCall / ToolChoice, the API-neutral shapes every route converts to
formats.py   how a family's chat template shows tools and how its models write calls; the
             grammar that makes a call valid against the function's schema
parse.py     finding the calls in generated text, whole or as it streams
"""
