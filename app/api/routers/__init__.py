"""One router per area of the API; each is thin: parse → call the service → shape the answer."""
