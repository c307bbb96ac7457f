"""Text messages: what they say, the one rate-limited sender, replies to inbound texts.

Layer: uses ``core``, ``crm`` and ``telephony``. The voice path only queues texts (rows in
``messages``, through ``crm``); the senders of the web server and the campaign worker
send them.
"""
