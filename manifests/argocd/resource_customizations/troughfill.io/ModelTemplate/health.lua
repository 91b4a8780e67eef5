-- Argo CD health of a troughfill ModelTemplate: Ready when it is valid and its pool exists.
local hs = {}
if obj.status ~= nil and obj.status.conditions ~= nil then
  local generation = obj.metadata.generation
  local observed = obj.status.observedGeneration
  if generation ~= nil and (observed == nil or observed < generation) then
    hs.status = "Progressing"
    hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
    return hs
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then
      if c.status == "True" then
        hs.status = "Healthy"
      else
        hs.status = "Degraded"
      end
      hs.message = tostring(c.message)
      return hs
    end
  end
end
hs.status = "Progressing"
hs.message = "Waiting for the operator to check the template"
return hs
