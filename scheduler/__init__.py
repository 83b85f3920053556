"""The server's scheduling on its Ray cluster: the Ray runner of the stage sequence
(``cryptogen.driver``) over the worker actors; ``inprocess`` runs both parties as threads, for tests."""
