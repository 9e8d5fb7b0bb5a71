"""Model sources of the benchmarks and tests: decoder LLMs written as ONNX graphs (docs/llm.md)."""
