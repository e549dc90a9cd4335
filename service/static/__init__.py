"""The demo page's files (HTML, CSS, JS), shipped as package data and served by `service.api.demo`."""
