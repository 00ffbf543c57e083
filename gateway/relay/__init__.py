"""The relay: the outbound tunnel to the hub, the reference hub, and their protocol."""
