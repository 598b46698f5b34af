"""What makes the protocol in app.py fast and durable, one module per concern.

app.py is the protocol as a learner reads it; nothing here changes what it
answers. Each module opens by saying what it adds, why, and which tests
prove it. The layers import one way: errors, database, postgres, event_loop,
writer, long_poll, input and browser sit below app.py and never import it; openapi and
cli sit above it, describe and drive it, and are loaded by create_app.
"""
