"""The federation itself: the server's round loop, the device client, the server's store,
strategies, and the one module that wires them to a transport."""
