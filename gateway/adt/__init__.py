"""The PAS's ADT feed (an inbound MLLP listener) and the notifications it drives.

``events``: an ADT message → the FHIR resources the HL7 v2 mappings make of it, and its ACK.
``store``: the durable record (events, merges, subscriptions, the notification outbox).
``listener``: MLLP in, ACK only after the store committed. ``delivery``: rest-hook out.
``criteria``: which events a Subscription wants. ``api``: Subscription over the FHIR API.
``merges``: retired patient ids answered as STU3 says (Patient.link replaced-by).
"""
