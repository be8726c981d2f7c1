"""The lean runtime: bundle, tokenizer, scheduler, sessions (onnxruntime, torch, TensorRT) and the loop."""
