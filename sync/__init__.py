"""The durable audit log, its upstream replication and verification."""
