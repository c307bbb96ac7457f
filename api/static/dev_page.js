// The browser test page: one WebRTC call to the bot, and its transcript.
//
// Signalling is Pipecat's SmallWebRTC protocol on this server: POST /start (the customer
// to play) gives a session id; POST /sessions/{id}/api/offer {sdp, type, pc_id,
// restart_pc} answers with {sdp, type, pc_id, call_sid}; PATCH on the same address sends
// ICE candidates found after the offer {pc_id, candidates: [{candidate, sdp_mid,
// sdp_mline_index}]}. The transcript is polled from /client/calls/{call_sid}/transcript
// (the call's session snapshot). Requests carry the page's HttpOnly access cookie.
(function () {
  "use strict";
  var form = document.getElementById("call-form");
  if (!form) { return; }
  var callButton = document.getElementById("call-button");
  var hangupButton = document.getElementById("hangup-button");
  var stateBadge = document.getElementById("call-state");
  var errorBox = document.getElementById("call-error");
  var transcript = document.getElementById("transcript");
  var audio = document.getElementById("bot-audio");
  var callsPossible = !callButton.disabled;

  var ICE_GATHER_MS = 2000;
  var POLL_MS = 700;
  var POLLS_AFTER_HANGUP = 15;

  var pc = null;
  var mic = null;
  var callSid = null;
  var shown = 0;        // turns shown so far (the number of the next turn)
  var pollTimer = null;
  var pollsLeft = null; // counts down once the call has ended
  var active = false;

  function setState(text, css) {
    stateBadge.textContent = text;
    stateBadge.className = "live-state" + (css ? " " + css : "");
  }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  function setButtons(inCall) {
    callButton.disabled = inCall || !callsPossible;
    hangupButton.disabled = !inCall;
    var radios = form.querySelectorAll("input[name=caller]");
    for (var i = 0; i < radios.length; i++) { radios[i].disabled = inCall; }
  }

  function startBody() {
    var picked = form.querySelector("input[name=caller]:checked");
    var value = picked ? picked.value : "unknown";
    if (value === "unknown") { return {body: {caller: "unknown"}}; }
    if (value === "link") { return {}; } // the server plays the number of the link
    return {body: {customer_id: Number(value)}};
  }

  async function postJson(url, body, method) {
    var response = await fetch(url, {
      method: method || "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    var data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      var reason = (data && (data.error || data.detail)) || ("HTTP " + response.status);
      throw new Error(typeof reason === "string" ? reason : JSON.stringify(reason));
    }
    return data;
  }

  function iceGathered(peer) {
    if (peer.iceGatheringState === "complete") { return Promise.resolve(); }
    return new Promise(function (resolve) {
      var timer = setTimeout(resolve, ICE_GATHER_MS);
      peer.addEventListener("icegatheringstatechange", function () {
        if (peer.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
      });
    });
  }

  function clearTranscript() {
    shown = 0;
    transcript.textContent = "";
  }

  function addTurn(turn) {
    var item = document.createElement("li");
    item.className = "turn " + (turn.role === "bot" ? "bot" : "caller");
    if (turn.interrupted) { item.className += " was-interrupted"; }
    var speaker = document.createElement("span");
    speaker.className = "speaker";
    speaker.textContent = turn.role === "bot" ? "Assistant" : "You";
    var text = document.createElement("span");
    text.className = "text";
    text.textContent = turn.text;
    item.appendChild(speaker);
    item.appendChild(text);
    if (turn.interrupted) {
      var mark = document.createElement("span");
      mark.className = "interrupted";
      mark.textContent = "interrupted";
      item.appendChild(mark);
    }
    transcript.appendChild(item);
    transcript.scrollTop = transcript.scrollHeight;
  }

  async function poll() {
    pollTimer = null;
    if (!callSid) { return; }
    var sid = callSid;
    var finished = false;
    try {
      var response = await fetch(
        "/client/calls/" + encodeURIComponent(sid) + "/transcript?after=" + shown,
        {credentials: "same-origin", cache: "no-store"}
      );
      if (response.ok) {
        var data = await response.json();
        if (sid !== callSid) { return; }
        var turns = data.turns || [];
        for (var i = 0; i < turns.length; i++) {
          if (turns[i].n >= shown) { addTurn(turns[i]); shown = turns[i].n + 1; }
        }
        finished = !!data.finished;
      } else if (response.status === 401) {
        window.location.assign("/client/");
        return;
      }
    } catch (e) {
      // The server is restarting or the network hiccupped: try again at the next tick.
    }
    if (finished) {
      if (active) { hangUp("The call ended."); }
      pollsLeft = 0;
    }
    if (pollsLeft !== null) {
      if (pollsLeft <= 0) { callSid = null; return; }
      pollsLeft -= 1;
    }
    pollTimer = setTimeout(poll, POLL_MS);
  }

  function stopMedia() {
    if (mic) { mic.getTracks().forEach(function (t) { t.stop(); }); mic = null; }
    if (pc) { try { pc.close(); } catch (e) { /* already closed */ } pc = null; }
    audio.srcObject = null;
  }

  function hangUp(message) {
    if (!active) { return; }
    active = false;
    stopMedia();
    setButtons(false);
    setState(message || "Call ended", "");
    pollsLeft = POLLS_AFTER_HANGUP; // the last turns are written as the call ends
  }

  async function call() {
    showError("");
    setButtons(true);
    active = true;
    setState("Connecting…", "busy");
    if (pollTimer) { clearTimeout(pollTimer); pollTimer = null; }
    callSid = null;
    pollsLeft = null;
    clearTranscript();
    try {
      var started = await postJson("/start", startBody());
      mic = await navigator.mediaDevices.getUserMedia({audio: true, video: false});
      pc = new RTCPeerConnection();
      var peer = pc;
      var pcId = null;
      var late = [];
      mic.getAudioTracks().forEach(function (track) { peer.addTrack(track, mic); });
      peer.addEventListener("track", function (event) {
        audio.srcObject = event.streams && event.streams[0]
          ? event.streams[0] : new MediaStream([event.track]);
      });
      peer.addEventListener("connectionstatechange", function () {
        if (peer !== pc) { return; }
        var s = peer.connectionState;
        if (s === "connected") { setState("In call", "on"); }
        else if (s === "failed") { showError("The connection to the server failed."); hangUp("Call failed"); }
        else if (s === "disconnected" || s === "closed") { hangUp("Call ended"); }
      });
      var offerUrl = "/sessions/" + encodeURIComponent(started.sessionId) + "/api/offer";
      var gathering = true;
      peer.addEventListener("icecandidate", function (event) {
        if (!event.candidate || gathering) { return; }
        var candidate = {
          candidate: event.candidate.candidate,
          sdp_mid: event.candidate.sdpMid,
          sdp_mline_index: event.candidate.sdpMLineIndex,
        };
        if (pcId) {
          postJson(offerUrl, {pc_id: pcId, candidates: [candidate]}, "PATCH").catch(function () {});
        } else {
          late.push(candidate);
        }
      });
      await peer.setLocalDescription(await peer.createOffer());
      await iceGathered(peer);  // candidates found so far travel in the offer
      gathering = false;
      var answer = await postJson(offerUrl, {
        sdp: peer.localDescription.sdp,
        type: peer.localDescription.type,
        pc_id: null,
        restart_pc: false,
      });
      if (peer !== pc) { return; } // hung up meanwhile
      pcId = answer.pc_id;
      await peer.setRemoteDescription({type: answer.type, sdp: answer.sdp});
      if (late.length) {
        await postJson(offerUrl, {pc_id: pcId, candidates: late}, "PATCH").catch(function () {});
      }
      callSid = answer.call_sid || null;
      if (callSid) { poll(); }
    } catch (err) {
      var text = err && err.name === "NotAllowedError"
        ? "The browser did not allow the microphone."
        : (err && err.message) || String(err);
      showError("Could not start the call: " + text);
      hangUp("Ready");
    }
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (!active && callsPossible) { call(); }
  });
  hangupButton.addEventListener("click", function () { hangUp("Call ended"); });
  window.addEventListener("pagehide", function () { stopMedia(); });
})();
