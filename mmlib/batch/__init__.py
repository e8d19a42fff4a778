"""Bulk generation through mm's endpoint (`mm batch`): the input's prompts, the resumable output
store, the requests each prompt needs, and the async runner that sends them."""
