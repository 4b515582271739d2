"""FHIR messaging: ``POST [base]/$process-message``, routed by YAML to adapter writes.

``config`` reads ``<mapping dir>/messaging.yaml`` (events → the type and write each one is);
``store`` is the durable record (SQLite in the data directory): each message's response by
MessageHeader.id (idempotency), the accepted asynchronous messages, and the outbox of
responses to deliver; ``process`` is the operation; ``delivery`` the outbox's sender.
"""
