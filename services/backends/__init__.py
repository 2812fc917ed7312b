"""What runs models: bundles and onnxruntime sessions, batching, the in-process and shared runners, the model store, explanations."""
