"""Startup kits: the federation file, PKI, Mosquitto files, kit configs and manifests, and
running a server, a device or the broker from its kit."""
