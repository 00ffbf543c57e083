"""Exchange Online rooms through Microsoft Graph (msal client credentials + aiohttp)."""
