"""The relay, the gateway's side: the outbound tunnel to the hub, enrollment, and the protocol both ends share
(the hub itself is gateway/hub/)."""
