"""What runs on a device with no torch: the onnxruntime inference runtime, the edge agent, its
HTTP endpoint and its installed versions."""
