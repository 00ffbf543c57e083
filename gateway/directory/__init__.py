"""The organisation's directory (people, rooms, service accounts) outside the calendar sources: Active Directory over
LDAP (ldap.py). An adapter: it knows the ports and the model, never another adapter."""
