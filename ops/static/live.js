// Live calls: replace the list with each server-sent "calls" event (HTML rendered and
// escaped by the server). The browser reconnects by itself when a stream ends.
(function () {
  "use strict";
  var box = document.getElementById("live-calls");
  var state = document.getElementById("live-state") || document.getElementById("live-status");
  if (!box || !window.EventSource) {
    if (state) { state.textContent = "Reload for updates"; }
    return;
  }
  function show(text, css) {
    if (state) { state.textContent = text; state.className = "live-state " + css; }
  }
  var source = new EventSource(box.getAttribute("data-stream"));
  source.addEventListener("open", function () { show("Live", "on"); });
  source.addEventListener("calls", function (event) {
    box.innerHTML = event.data;
    show("Live", "on");
  });
  source.addEventListener("logout", function () {
    source.close();
    window.location.assign("/ops/login?next=%2Fops%2Flive");
  });
  source.addEventListener("error", function () {
    if (source.readyState === EventSource.CLOSED) {
      // Refused (the session ended): go to the login page.
      window.location.assign("/ops/login?next=%2Fops%2Flive");
    } else {
      show("Reconnecting…", "off");
    }
  });
})();
