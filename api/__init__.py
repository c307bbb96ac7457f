"""The web app's routes: Twilio webhooks and media streams, ops endpoints and the local browser
page.
"""
