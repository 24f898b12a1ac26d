"use strict";
// Swagger UI for /docs, from files this server serves itself (no CDN; no inline script under the CSP).
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
});
