"""The demo page's files (HTML, CSS, JS), shipped as package data and served by `clipserve.service.api.demo`."""
