"""Getting trained students onto devices: ONNX export with parity and int8, bundles and their
signed descriptors, and `fededge deploy`."""
