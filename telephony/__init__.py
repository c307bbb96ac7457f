"""Twilio glue shared by the bot, the web routes and the campaigns: signatures, stream tokens,
TwiML, REST dialing and call control.
"""
