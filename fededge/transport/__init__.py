"""Moving bytes: the Transport interface, its paho-mqtt and in-memory implementations,
chunking, fault injection and the brokers. Knows nothing of rounds or tensors."""
