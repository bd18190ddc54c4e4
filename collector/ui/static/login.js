// The 401 page of /ui: store the token as a same-site cookie scoped to /ui, then reload.
"use strict";
document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = document.getElementById("token").value.trim();
  document.cookie = "tracetrain_token=" + encodeURIComponent(token) + "; path=/ui; SameSite=Strict";
  location.reload();
});
