"""The Exchange Online side of the simulator: Microsoft Graph v1.0 and an Entra ID token endpoint, over HTTPS.

It serves the same organisation as the EWS side (gateway/simulator/mailboxes.py): mailboxes whose ``side`` is
"graph" are reachable here and not through EWS, the others the reverse, and a meeting that crosses reaches the
other side's mailboxes with the same global object id, as hybrid mail flow delivers it.
"""
