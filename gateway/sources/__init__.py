"""Calendar sources: adapters that read (and later write) room calendars."""
